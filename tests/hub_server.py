"""A small in-memory Hugging Face Hub for tests: the HTTP endpoints the real ``huggingface_hub`` client calls to check
a token, create a model repo, commit files (regular and Git LFS, basic transfer) and download them, on 127.0.0.1.

Point the client at it with ``HF_ENDPOINT=server.url`` (read when huggingface_hub is imported) and
``HF_HUB_DISABLE_XET=1`` (Xet storage is not served). Every request is recorded, the Authorization value left out.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

TOKEN = "hf_LocalHubServerTestTokenAbcdefghijkl"  # "hf_" + 34 letters: shaped like a real token
USER = "tester"

# The .gitattributes the Hub puts in every new model repo (the LFS part of it).
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz "
        "*.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar "
        "*.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
    ).split()
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # larger files must go through LFS, as on the Hub


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class StoredFile:
    path: str
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, len(self.content))

    @property
    def git_oid(self) -> str:
        """The git blob id: of the content, or of the LFS pointer file for LFS files."""
        return git_blob_oid(self.pointer if self.lfs else self.content)

    @property
    def oid(self) -> str:
        """What preupload reports and the client compares with its local file: sha256 for LFS, git blob id else."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Commit:
    oid: str
    title: str
    message: str
    parent: str | None
    files: dict[str, StoredFile]
    date: str = field(default_factory=now_iso)


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    commits: list[Commit] = field(default_factory=list)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def commit_at(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.head
        if len(revision) >= 7:
            for commit in reversed(self.commits):
                if commit.oid.startswith(revision):
                    return commit
        return None

    def lfs_patterns(self) -> list[str]:
        attributes = self.head.files.get(".gitattributes")
        text = attributes.content.decode() if attributes else ""
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]


@dataclass
class Request:
    """One request as the server saw it; ``headers`` has the Authorization value replaced by ``<redacted>``."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    authenticated: bool
    status: int = 0


class _Reply(Exception):
    def __init__(self, status: int, body=None, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def _error(status: int, message: str, code: str | None = None) -> _Reply:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return _Reply(status, {"error": message}, headers)


REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{REPO}", "repo_info"),
    ("GET", rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)", "repo_info"),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "create_commit"),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("GET", rf"/api/models/{REPO}/commits/(?P<rev>[^/]+)", "list_commits"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
    ("PUT", rf"/_lfs/{REPO}/(?P<oid>[0-9a-f]{{64}})", "lfs_upload"),
    ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


class HubServer:
    """``with HubServer() as hub: ...`` serves on ``hub.url``. ``tokens`` maps accepted tokens to (user, role)."""

    def __init__(self, tokens: dict[str, tuple[str, str]] | None = None):
        self.tokens = tokens if tokens is not None else {TOKEN: (USER, "write")}
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.validated_cards: list[str] = []
        self.errors: list[str] = []
        self._failures: list[list] = []  # [method, path regex, status, remaining or None]
        self._uploads: dict[str, tuple[str, str, int]] = {}  # signature -> (repo, oid, size)
        self._lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- for tests -------------------------------------------------------------------------------------------

    def fail(self, method: str, path_regex: str, status: int = 503, times: int | None = 1) -> None:
        """Answer the next ``times`` matching requests (all of them if None) with ``status``."""
        with self._lock:
            self._failures.append([method, re.compile(path_regex), status, times])

    def calls(self, method: str | None = None, path_regex: str | None = None) -> list[Request]:
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and (path_regex is None or re.search(path_regex, r.path))
            ]

    # --- request handling ------------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        split = urlsplit(raw_path)
        path, query = split.path, parse_qs(split.query)
        authorization = headers.get("Authorization")
        record = Request(
            method=method,
            path=path,
            query=query,
            headers={k: ("<redacted>" if k.lower() == "authorization" else v) for k, v in headers.items()},
            body=body,
            authenticated=authorization is not None,
        )
        with self._lock:
            self.requests.append(record)
            try:
                self._inject_failure(method, path)
                for route_method, pattern, name in ROUTES:
                    match = re.fullmatch(pattern, path)
                    if route_method == method and match:
                        args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                        user = self._user(authorization)
                        reply = getattr(self, f"_{name}")(user=user, body=body, query=query, method=method, **args)
                        break
                else:
                    raise _error(404, f"No route for {method} {path}")
            except _Reply as raised:
                reply = raised
            except Exception as error:  # a bug here: answer 500 and keep it for the test to see
                self.errors.append(repr(error))
                reply = _Reply(500, {"error": f"test server bug: {error!r}"})
            record.status = reply.status
        headers_out = dict(reply.headers)
        if isinstance(reply.body, bytes):
            data = reply.body
        else:
            data = json.dumps(reply.body).encode() if reply.body is not None else b""
            headers_out.setdefault("Content-Type", "application/json")
        return reply.status, data, headers_out

    def _inject_failure(self, method: str, path: str) -> None:
        for failure in self._failures:
            fail_method, pattern, status, remaining = failure
            if fail_method == method and pattern.search(path) and (remaining is None or remaining > 0):
                if remaining is not None:
                    failure[3] = remaining - 1
                raise _error(status, f"Injected failure ({status})")

    def _user(self, authorization: str | None) -> str | None:
        if not authorization or not authorization.startswith("Bearer "):
            return None
        account = self.tokens.get(authorization.removeprefix("Bearer ").strip())
        if account is None:
            raise _error(401, "Invalid credentials in Authorization header")
        return account[0]

    def _role(self, user: str) -> str:
        return next(role for name, role in self.tokens.values() if name == user)

    def _repo(self, repo_id: str, user: str | None, *, write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise _error(404 if user else 401, "Repository not found", "RepoNotFound")
        if write and (user != repo.owner or self._role(user) == "read"):
            raise _error(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.commit_at(revision)
        if commit is None:
            raise _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _new_commit(self, repo: Repo, title: str, message: str, files: dict[str, StoredFile]) -> Commit:
        parent = repo.commits[-1].oid if repo.commits else None
        seed = json.dumps([parent, title, len(repo.commits), sorted((p, f.git_oid) for p, f in files.items())])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), title, message, parent, files)
        repo.commits.append(commit)
        return commit

    def _agent_harnesses(self, **_):
        """huggingface_hub fetches this registry (once a day, cached in HF_HOME) to build its user agent."""
        return _Reply(200, {"standardEnvVars": [], "harnesses": {}})

    def _whoami(self, user, **_):
        if user is None:
            raise _error(401, "Invalid credentials in Authorization header")
        return _Reply(
            200,
            {
                "type": "user",
                "name": user,
                "fullname": user.title(),
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": self._role(user)}},
            },
        )

    def _create_repo(self, user, body, **_):
        if user is None:
            raise _error(401, "Invalid credentials in Authorization header")
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise _error(400, "This test server only hosts model repos")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if repo_id in self.repos:
            raise _Reply(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        if namespace != user or self._role(user) == "read":
            raise _error(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        private = payload.get("visibility") == "private" or payload.get("private") is True
        repo = self.repos[repo_id] = Repo(repo_id, owner=user, private=private)
        gitattributes = StoredFile(".gitattributes", GITATTRIBUTES.encode(), lfs=False)
        self._new_commit(repo, "initial commit", "", {".gitattributes": gitattributes})
        return _Reply(200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _repo_info(self, user, repo, rev="main", **_):
        stored = self._repo(repo, user)
        commit = self._revision(stored, rev)
        return _Reply(
            200,
            {
                "id": stored.repo_id,
                "_id": hashlib.sha1(stored.repo_id.encode()).hexdigest()[:24],
                "author": stored.owner,
                "sha": commit.oid,
                "private": stored.private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "lastModified": commit.date,
                "createdAt": stored.commits[0].date,
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            },
        )

    def _validate_yaml(self, body, **_):
        content = json.loads(body)["content"]
        self.validated_cards.append(content)
        match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", content, re.DOTALL)
        if match is None:
            return _Reply(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            return _Reply(400, {"errors": [{"message": f"Invalid YAML in README.md: {error}"}], "warnings": []})
        if metadata is not None and not isinstance(metadata, dict):
            return _Reply(400, {"errors": [{"message": "YAML metadata must be a mapping"}], "warnings": []})
        return _Reply(200, {"errors": [], "warnings": []})

    def _preupload(self, user, repo, rev, body, **_):
        stored = self._repo(repo, user, write=True)
        commit = self._revision(stored, rev)
        patterns = stored.lfs_patterns()
        files = []
        for item in json.loads(body)["files"]:
            path, size = item["path"], item["size"]
            sample = base64.b64decode(item["sample"])
            name = path.rsplit("/", 1)[-1]
            lfs = (
                any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(name, p) for p in patterns)
                or size >= LFS_SIZE_THRESHOLD
                or b"\0" in sample
            )
            existing = commit.files.get(path)
            files.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid if existing is not None else None,
                }
            )
        return _Reply(200, {"files": files, "commitOid": commit.oid})

    def _lfs_batch(self, user, repo, body, **_):
        stored = self._repo(repo, user, write=True)
        payload = json.loads(body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise _error(400, "Only the basic upload transfer is served")
        objects = []
        for item in payload["objects"]:
            oid, size = item["oid"], item["size"]
            entry = {"oid": oid, "size": size}
            if oid not in stored.lfs_objects:
                signature = secrets.token_hex(16)
                self._uploads[signature] = (repo, oid, size)
                entry["authenticated"] = True
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/_lfs/{repo}/{oid}?X-Signature={signature}", "expires_in": 900},
                    "verify": {"href": f"{self.url}/{repo}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(entry)
        return _Reply(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, repo, oid, body, query, **_):
        """A pre-signed storage URL: no Authorization header, the signature in the query authorises the PUT."""
        signature = (query.get("X-Signature") or [""])[0]
        if self._uploads.get(signature, (None, None, None))[:2] != (repo, oid):
            raise _error(403, "Bad or expired signature")
        _, _, size = self._uploads.pop(signature)
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise _error(400, "Uploaded content does not match the announced oid and size")
        self.repos[repo].lfs_objects[oid] = body
        return _Reply(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _lfs_verify(self, user, repo, body, **_):
        stored = self._repo(repo, user, write=True)
        payload = json.loads(body)
        data = stored.lfs_objects.get(payload["oid"])
        if data is None or len(data) != payload["size"]:
            raise _error(404, f"LFS object {payload['oid']} not found")
        return _Reply(200, {})

    def _create_commit(self, user, repo, rev, body, query, **_):
        stored = self._repo(repo, user, write=True)
        if rev != "main":
            raise _error(400, "This test server commits to main only")
        if query.get("create_pr"):
            raise _error(400, "This test server does not open pull requests")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _error(400, "The first NDJSON line must be the commit header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and not stored.head.oid.startswith(parent):
            raise _error(412, "A commit has happened since. Please refresh and try again.")
        files = dict(stored.head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _error(400, "Only base64 file content is accepted")
                files[path] = StoredFile(path, base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = stored.lfs_objects.get(value["oid"])
                if data is None:
                    raise _error(422, f"LFS object {value['oid']} for {path} was never uploaded")
                files[path] = StoredFile(path, data, lfs=True)
            elif key == "deletedFile":
                if path not in files:
                    raise _error(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                files = {p: f for p, f in files.items() if not p.startswith(path.rstrip("/") + "/")}
            else:
                raise _error(400, f"Unknown commit operation {key!r}")
        commit = self._new_commit(stored, header["summary"], header.get("description", ""), files)
        return _Reply(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.url}/{repo}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )

    def _tree(self, user, repo, rev, query, path="", **_):
        commit = self._revision(self._repo(repo, user), rev)
        recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, folders = [], set()
        for file_path, stored in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            entry = {"type": "file", "oid": stored.git_oid, "size": len(stored.content), "path": file_path}
            if stored.lfs:
                entry["lfs"] = {"oid": stored.sha256, "size": len(stored.content), "pointerSize": len(stored.pointer)}
            entries.append(entry)
        if recursive:
            for file_path in commit.files:
                parts = file_path[len(prefix) :].split("/")[:-1] if file_path.startswith(prefix) else []
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
        entries += [{"type": "directory", "oid": git_blob_oid(f.encode()), "path": f} for f in sorted(folders)]
        return _Reply(200, entries)

    def _list_commits(self, user, repo, rev, **_):
        stored = self._repo(repo, user)
        head = self._revision(stored, rev)
        history = stored.commits[: stored.commits.index(head) + 1]
        return _Reply(
            200,
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": stored.owner}],
                    "date": c.date,
                }
                for c in reversed(history)
            ],
        )

    def _resolve(self, user, repo, rev, path, method, **_):
        commit = self._revision(self._repo(repo, user), rev)
        stored = commit.files.get(path)
        if stored is None:
            raise _Reply(
                404,
                {"error": "Entry not found"},
                {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": commit.oid},
            )
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{stored.git_oid}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        if stored.lfs:
            headers["X-Linked-Etag"] = f'"{stored.sha256}"'
            headers["X-Linked-Size"] = str(len(stored.content))
        return _Reply(200, stored.content, headers)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr access log
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        body = self._read_body()
        status, data, headers = self.server.hub.handle(self.command, self.path, self.headers, body)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_HEAD = _serve
