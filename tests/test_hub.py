"""Publishing a run on the Hub (captioning/hub.py, push_to_hub.py) against a local Hub-compatible server.

A real output_dir (a LoRA adapter saved by peft, the processor, a card, figures, results, and the things that must
stay local: training_args.bin holding a token, a checkpoint, tensorboard runs) is pushed by the real
``huggingface_hub`` client, mostly through the ``push_to_hub.py`` command line in a subprocess, to
``tests/hub_server.py``; the outcomes are read back through the same client: repo visibility, the file set, the bytes,
LFS versus regular uploads, the card, commits, and that an adapter downloaded from the server loads and captions.
A real training run (``run_captioning.py --push_to_hub`` from a local base and a local dataset folder) shows what a
push shares: no local path in any pushed byte, dataset content only with --push_samples, private repos by default,
and a card rendered for the repo pushed to; repos made by others and weights of the other kind are handled in one
commit (deletions included).

What this does NOT prove: anything the real Hub decides on its side. Xet storage (the default upload path when hf_xet
is installed; here HF_HUB_DISABLE_XET=1 exercises the legacy LFS path), multipart LFS uploads of large files, its
rules for which files must be LFS, its YAML / model-card validation rules (e.g. that ``base_model`` names a real
repo), rate limits, permissions of organisations and fine-grained tokens, gated or disabled repos, pull requests,
resource groups and regions, CDN redirects on download, and server-side behaviour under concurrent commits. The
server answers what the installed client version asks for; a client upgrade that calls other endpoints shows here as
a failing test, not as a pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers.utils.hub as transformers_hub
from hub_server import TOKEN, USER, HubServer
from huggingface_hub import HfApi, ModelCard, constants, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import AutoProcessor, BlipForConditionalGeneration

import run_captioning
from captioning import hub
from captioning.arguments import parse_args
from captioning.families import detect_family
from captioning.model_card import CARD_CONTEXT, redact_tokens
from collators import CaptionCollator, build_layout
from tests.conftest import make_caption_folder, tiny_run_argv

ROOT = Path(__file__).resolve().parents[1]
TOKEN_SHAPE = re.compile(rb"hf_[A-Za-z0-9]{30,}")
OTHER_TOKEN = "hf_" + "WrongTokenThatTheServerDoesNotKnow"  # token-shaped too, so the scans cover it
BASE_MODEL = "Salesforce/blip-image-captioning-base"
CARD = f"""---
library_name: peft
base_model: {BASE_MODEL}
tags:
- image-to-text
- lora
---
# BLIP captioner fine-tuned with LoRA

Captions in the style of the training set.
"""
LOCAL_ONLY_FILES = {"training_args.bin", "notes.txt"}  # top-level files of the run that must not be pushed

# huggingface_hub's LFS upload passes a file object as `data=` (httpx2 deprecates that): their drift, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


# --- fixtures and helpers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tiny_blip, tmp_path_factory) -> Path:
    """A finished run's output_dir, adapter and processor saved for real, plus everything else a run leaves there."""
    out = tmp_path_factory.mktemp("run") / "out"
    model = BlipForConditionalGeneration.from_pretrained(tiny_blip)
    # init_lora_weights=False: a non-zero adapter, so that loading it changes the captions.
    lora = LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    # Trained from the Hub model (tiny_blip stands in for it): what adapter_config.json then names.
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": BASE_MODEL}))
    AutoProcessor.from_pretrained(tiny_blip).save_pretrained(out)
    (out / "README.md").write_text(CARD)
    for name, colour in (("training_curves.png", (200, 30, 30)), ("samples.png", (30, 30, 200))):
        Image.new("RGB", (64, 48), colour).save(out / name)
    metrics = {"eval_cider": 1.25, "eval_bleu_4": 0.31, "eval_loss": 2.5}
    for name in ("eval_results.json", "baseline_results.json", "all_results.json"):
        (out / name).write_text(json.dumps(metrics))
    (out / "train_results.json").write_text(json.dumps({"train_loss": 2.1, "train_runtime": 3.2}))
    (out / "predict_results.json").write_text(json.dumps({"test_cider": 1.1}))
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": [{"loss": 2.1}]}))
    (out / "captioning_config.json").write_text(json.dumps({"family": "blip", "caption_prompt": ""}))
    (out / "data_report.json").write_text(json.dumps({"train_images": 12}))
    (out / "predictions.jsonl").write_text(json.dumps({"image": "a.png", "prediction": "a dog", "references": []}))
    # What must stay local: transformers pickles --hub_token into training_args.bin; checkpoints; tensorboard.
    (out / "training_args.bin").write_bytes(b"\x80\x04pickled TrainingArguments hub_token=" + TOKEN.encode())
    (out / "notes.txt").write_text("scratch notes, not part of the run's outputs\n")
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "optimizer.pt").write_bytes(b"optimizer state" * 10)
    (out / "checkpoint-5" / "adapter_model.safetensors").write_bytes((out / "adapter_model.safetensors").read_bytes())
    (out / "runs").mkdir()
    (out / "runs" / "events.out.tfevents.1700000000.host").write_bytes(b"tensorboard events")
    return out


def expected_files(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir() if p.is_file()} - LOCAL_ONLY_FILES


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (to show a failed push left it byte-for-byte intact)."""
    files = (path for path in sorted(folder.rglob("*")) if path.is_file())
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def run_cli(
    *args: str,
    server: HubServer,
    home: Path,
    token: str | None = TOKEN,
    script: str = "push_to_hub.py",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``python push_to_hub.py ...`` in a fresh process: HF_ENDPOINT and the token as a user would set them; ``env``
    adds or overrides variables (HOME, say)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "HUGGINGFACE"))}
    environment.pop("TRANSFORMERS_OFFLINE", None)
    environment.update(
        HF_ENDPOINT=server.url,
        HF_HOME=str(home),  # no login store, cache or registry of the machine running the tests
        HF_HUB_OFFLINE="0",  # conftest sets 1 for the rest of the suite; it blocks loopback too
        HF_HUB_DISABLE_XET="1",  # Xet storage cannot be served locally: exercise the LFS path
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    if token is not None:
        environment["HF_TOKEN"] = token
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@contextlib.contextmanager
def client_for(server: HubServer, home: Path, token: str | None = TOKEN):
    """The in-process huggingface_hub pointed at ``server``. It reads its settings when imported, so patch them."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "ENDPOINT": server.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "AGENT_HARNESSES_PATH": str(home / "agent_harnesses.json"),
        }.items():
            patch.setattr(constants, name, value)
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            patch.delenv(name, raising=False)
        if token is not None:
            patch.setenv("HF_TOKEN", token)
        patch.setattr(hub, "RETRY_BASE_DELAY_S", 0.0)
        # transformers keeps one HfApi with the endpoint of its first use: made by an earlier test, that is
        # huggingface.co (unreachable here) or another server, now gone; huggingface_hub retries its connection
        # errors with backoff, for minutes, before transformers gives up on it.
        patch.setattr(transformers_hub, "_hf_api", None)
        yield HfApi(endpoint=server.url, token=TOKEN)


@pytest.fixture
def server():
    with HubServer() as running:
        yield running
        assert running.errors == []


@pytest.fixture
def api(server, tmp_path):
    with client_for(server, tmp_path / "hf-home") as client:
        yield client


def commit_posts(server: HubServer) -> list:
    return server.calls("POST", r"^/api/models/.+/commit/")


def caption_with(model, processor_dir: Path, image: Image.Image) -> str:
    """Caption one image as the trainer does: a generation batch from CaptionCollator, decoded by the layout."""
    processor = AutoProcessor.from_pretrained(processor_dir)
    layout = build_layout(detect_family(model.config), model.config, processor.tokenizer)
    batch = CaptionCollator(processor.image_processor, processor.tokenizer, layout)(
        [{"image": image, "image_index": 0}]
    )
    batch.pop("image_index")
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=4, num_beams=2)
    return layout.decode(generated, processor.tokenizer)[0]


@pytest.fixture(scope="module")
def pushed(run_dir, tmp_path_factory):
    """run_dir pushed once by the command line (default visibility, samples asked for) to a new repo, then read back
    through the real client."""
    home = tmp_path_factory.mktemp("hf-home")
    repo = f"{USER}/blip-lora"
    with HubServer() as server:
        proc = run_cli(str(run_dir), "--hub_model_id", repo, "--push_samples", server=server, home=home)
        assert proc.returncode == 0, proc.stderr
        with client_for(server, home) as api:
            info = api.model_info(repo)
            tree = [f for f in api.list_repo_tree(repo, recursive=True) if isinstance(f, RepoFile)]
            commits = api.list_repo_commits(repo)
            try:
                api.model_info(repo, token=False)
                anonymous_error = None
            except RepositoryNotFoundError as error:
                anonymous_error = error
            download = Path(snapshot_download(repo, token=TOKEN, local_dir=home / "download"))
    assert server.errors == []
    return SimpleNamespace(
        server=server,
        proc=proc,
        repo=repo,
        info=info,
        tree={f.path: f for f in tree},
        commits=commits,
        anonymous_error=anonymous_error,
        download=download,
    )


# --- the main push, through the command line -----------------------------------------------------------------------


def test_cli_pushes_exactly_the_allow_listed_files(pushed, run_dir):
    expected = expected_files(run_dir)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json"} <= expected
    assert set(pushed.tree) - {".gitattributes"} == expected
    every_pushed_path = {path for commit in pushed.server.repos[pushed.repo].commits for path in commit.files}
    assert not every_pushed_path & {"training_args.bin", "notes.txt", "optimizer.pt"}
    assert not any(path.startswith(("checkpoint-", "runs")) for path in every_pushed_path)
    assert len(pushed.commits) == 2  # the Hub's initial commit, then ours
    assert f"{pushed.server.url}/{pushed.repo}/commit/{pushed.commits[0].commit_id}" in pushed.proc.stdout
    assert "Kept local (not in the push allow-list): checkpoint-5/, notes.txt, runs/, training_args.bin" in (
        pushed.proc.stderr
    )


def test_new_repos_are_private_by_default(pushed):
    assert pushed.info.private is True
    assert isinstance(pushed.anonymous_error, RepositoryNotFoundError)


def test_run_captioning_makes_private_repos_unless_told_otherwise():
    base = ["--model_name_or_path", "m", "--dataset_dir", "d", "--output_dir", "o", "--do_train"]
    assert parse_args(base).training.hub_private_repo is True
    assert parse_args([*base, "--hub_private_repo", "false"]).training.hub_private_repo is False


def test_public_push_makes_a_public_repo(run_dir, server, tmp_path):
    repo = f"{USER}/blip-public"
    proc = run_cli(
        str(run_dir),
        "--hub_model_id",
        repo,
        "--hub_private_repo",
        "false",
        "--push_samples",
        server=server,
        home=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    with client_for(server, tmp_path, token=None) as api:
        info = api.model_info(f"{USER}/blip-public", token=False)  # readable without a token
    assert info.private is False
    assert {s.rfilename for s in info.siblings} - {".gitattributes"} == expected_files(run_dir)


def test_downloaded_files_equal_the_local_files(pushed, run_dir):
    for name in expected_files(run_dir):
        assert (pushed.download / name).read_bytes() == (run_dir / name).read_bytes(), name


def test_weights_and_images_go_through_lfs_and_text_files_do_not(pushed, run_dir):
    lfs = {path for path, f in pushed.tree.items() if f.lfs is not None}
    assert lfs == {"adapter_model.safetensors", "training_curves.png", "samples.png"}
    adapter_sha = hashlib.sha256((run_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert pushed.tree["adapter_model.safetensors"].lfs.sha256 == adapter_sha

    (batch,) = pushed.server.calls("POST", r"\.git/info/lfs/objects/batch$")
    assert adapter_sha in {item["oid"] for item in json.loads(batch.body)["objects"]}
    (put,) = pushed.server.calls("PUT", rf"/{adapter_sha}$")
    assert not put.authenticated  # the pre-signed storage URL gets no token
    assert put.body == (run_dir / "adapter_model.safetensors").read_bytes()

    (commit,) = commit_posts(pushed.server)
    lines = [json.loads(line) for line in commit.body.decode().splitlines()]
    kinds = {line["value"]["path"]: line["key"] for line in lines[1:]}
    assert kinds["adapter_model.safetensors"] == "lfsFile"
    assert kinds["adapter_config.json"] == kinds["README.md"] == kinds["tokenizer.json"] == "file"


def test_the_card_is_validated_and_parses(pushed):
    assert pushed.server.validated_cards == [CARD]
    card = ModelCard.load(pushed.download / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == BASE_MODEL


def test_the_client_calls_in_order(pushed):
    """The HTTP conversation of one push, as the installed huggingface_hub holds it (documents the server's scope)."""
    calls = [(r.method, re.sub(r"[0-9a-f]{64}", "<sha256>", r.path)) for r in pushed.server.requests]
    commit = ("POST", f"/api/models/{pushed.repo}/commit/main")
    push = [call for call in calls[: calls.index(commit) + 1] if call[1] != "/api/agent-harnesses"]
    assert push[:7] == [
        ("GET", "/api/whoami-v2"),  # before training: the token,
        ("GET", f"/api/models/{pushed.repo}"),  # and whether an existing repo would refuse the push (none yet)
        ("POST", "/api/repos/create"),
        ("GET", f"/api/models/{pushed.repo}"),
        ("POST", "/api/validate-yaml"),
        ("POST", f"/api/models/{pushed.repo}/preupload/main"),
        ("POST", f"/{pushed.repo}.git/info/lfs/objects/batch"),
    ]
    lfs = [("PUT", f"/_lfs/{pushed.repo}/<sha256>"), ("POST", f"/{pushed.repo}.git/info/lfs/objects/verify")]
    assert sorted(push[7:-1]) == sorted(lfs * 3)  # one upload + verify per LFS file, in parallel threads
    assert push[-1] == commit


def test_no_token_is_uploaded_or_printed(pushed, run_dir):
    assert TOKEN.encode() in (run_dir / "training_args.bin").read_bytes()  # the bait is there
    assert any(r.authenticated for r in pushed.server.requests)  # and the token was in use
    sent = [r.body for r in pushed.server.requests]
    sent += [f"{r.path} {r.query} {r.headers}".encode() for r in pushed.server.requests]
    sent += [f.content for commit in pushed.server.repos[pushed.repo].commits for f in commit.files.values()]
    sent += [pushed.proc.stdout.encode(), pushed.proc.stderr.encode()]
    for data in sent:
        assert TOKEN.encode() not in data
        assert TOKEN_SHAPE.search(data) is None


def test_the_adapter_from_the_hub_loads_and_captions(pushed, run_dir, tiny_blip):
    image = Image.new("RGB", (40, 36), (30, 30, 220))
    from_hub = PeftModel.from_pretrained(BlipForConditionalGeneration.from_pretrained(tiny_blip), pushed.download)
    local = PeftModel.from_pretrained(BlipForConditionalGeneration.from_pretrained(tiny_blip), run_dir)
    caption = caption_with(from_hub.eval(), pushed.download, image)
    assert isinstance(caption, str)
    assert caption == caption_with(local.eval(), run_dir, image)


# --- pushing again, failures and retries ---------------------------------------------------------------------------


def test_a_second_push_of_unchanged_files_makes_no_commit(run_dir, server, api):
    repo = f"{USER}/blip-again"
    url = hub.push_output_dir(run_dir, repo)
    assert url is not None and url.startswith(f"{server.url}/{repo}/commit/")
    commits = len(api.list_repo_commits(repo))
    assert hub.push_output_dir(run_dir, repo) is None
    assert len(api.list_repo_commits(repo)) == commits
    assert len(commit_posts(server)) == 1


def test_a_transient_commit_failure_is_retried(run_dir, server, api, caplog):
    repo = f"{USER}/blip-retry"
    server.fail("POST", r"/commit/main$", status=503, times=1)
    with caplog.at_level("WARNING", logger="captioning.hub"):
        url = hub.push_output_dir(run_dir, repo, private=True, push_samples=True)
    assert url is not None
    assert [r.status for r in commit_posts(server)] == [503, 200]
    assert "Push attempt 1/3 failed" in caplog.text and "503" in caplog.text
    assert {f.rfilename for f in api.model_info(repo).siblings} - {".gitattributes"} == expected_files(run_dir)


def test_persistent_server_errors_exhaust_the_retries_and_name_the_retry_command(run_dir, server, api):
    before = tree_digest(run_dir)
    server.fail("POST", r"/commit/main$", status=503, times=None)
    with pytest.raises(RuntimeError) as raised:
        hub.push_output_dir(run_dir, f"{USER}/blip-down", private=True, max_attempts=3)
    message = str(raised.value)
    assert "failed after 3 attempts" in message and "503" in message
    assert f"{run_dir} is intact" in message
    assert message.endswith(f"retry with: python push_to_hub.py {run_dir} --hub_model_id {USER}/blip-down")
    assert len(commit_posts(server)) == 3
    assert tree_digest(run_dir) == before


def test_a_permission_error_is_not_retried_and_the_cli_says_how_to_retry(run_dir, server, tmp_path):
    before = tree_digest(run_dir)
    server.fail("POST", r"/commit/main$", status=403, times=None)
    proc = run_cli(str(run_dir), "--hub_model_id", f"{USER}/blip-denied", server=server, home=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("push_to_hub.py: error:")]
    assert "403" in error and f"{run_dir} is intact" in error
    assert error.endswith(f"retry with: python push_to_hub.py {run_dir} --hub_model_id {USER}/blip-denied")
    assert len(commit_posts(server)) == 1
    assert tree_digest(run_dir) == before


def test_a_wrong_token_fails_clearly_before_any_upload(run_dir, server, tmp_path):
    proc = run_cli(str(run_dir), "--hub_model_id", f"{USER}/blip-x", server=server, home=tmp_path, token=OTHER_TOKEN)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"push_to_hub.py: error: The Hugging Face token from HF_TOKEN was rejected by {server.url} (401 Unauthorized): "
        "set HF_TOKEN to a valid write token (https://huggingface.co/settings/tokens) or run `hf auth login`."
    ]
    assert {(r.method, r.path) for r in server.requests} <= {("GET", "/api/whoami-v2"), ("GET", "/api/agent-harnesses")}
    assert server.repos == {}
    assert OTHER_TOKEN not in proc.stdout + proc.stderr


def test_the_cli_refuses_a_token_on_the_command_line_without_echoing_it(run_dir, server, tmp_path):
    proc = run_cli(
        str(run_dir), "--hub_model_id", f"{USER}/x", "--hub_token", OTHER_TOKEN, server=server, home=tmp_path
    )
    assert proc.returncode == 1
    assert "--hub_token is refused" in proc.stderr and "HF_TOKEN" in proc.stderr
    assert OTHER_TOKEN not in proc.stdout + proc.stderr
    assert server.requests == []


@pytest.mark.parametrize("quoted", [TOKEN, OTHER_TOKEN], ids=["the-token-in-use", "another-token"])
def test_a_file_quoting_a_token_is_not_pushed(run_dir, server, api, tmp_path, quoted):
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    (leaky / "adapter_config.json").write_bytes((run_dir / "adapter_config.json").read_bytes())
    (leaky / "README.md").write_text(f"trained with `--hub_token {quoted}`\n")
    with pytest.raises(ValueError, match="README.md contains a Hugging Face token") as raised:
        hub.push_output_dir(leaky, f"{USER}/leaky")
    assert quoted not in str(raised.value)
    assert server.requests == []


def test_a_card_with_broken_yaml_fails_before_any_upload(run_dir, server, api, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((run_dir / "adapter_config.json").read_bytes())
    (broken / "README.md").write_text("---\nlibrary_name: [peft\n---\n# card\n")
    with pytest.raises(RuntimeError, match="Invalid metadata in README.md.*is intact; once the cause is fixed"):
        hub.push_output_dir(broken, f"{USER}/broken")
    assert not server.calls(path_regex=r"/preupload/|/commit/|\.git/info/lfs")


def test_private_push_to_an_existing_public_repo_is_refused(run_dir, server, api):
    repo = f"{USER}/blip-was-public"
    hub.push_output_dir(run_dir, repo, private=False)
    with pytest.raises(RuntimeError, match="already exists and is public.*--hub_private_repo false"):
        hub.push_output_dir(run_dir, repo, private=True)
    with pytest.raises(RuntimeError, match="already exists and is public"):
        hub.push_output_dir(run_dir, repo)  # private is the default
    assert len(commit_posts(server)) == 1


# --- checks before training ----------------------------------------------------------------------------------------


def test_check_push_config_accepts_a_valid_token(server, api):
    hub.check_push_config(True, f"{USER}/blip", None)
    paths = [r.path for r in server.requests if r.path != "/api/agent-harnesses"]
    assert paths[0] == "/api/whoami-v2" and len(paths) == 2 and f"/api/models/{USER}/blip" in paths[1]  # no such repo
    assert commit_posts(server) == []


def test_a_push_the_existing_repo_would_refuse_fails_before_training(run_dir, server, api):
    """A public repo while a private push is asked, or another tool's repo: refused by the check before training,
    as the push itself would refuse them after training."""
    public = f"{USER}/public-captioner"
    hub.push_output_dir(run_dir, public, private=False)
    with pytest.raises(ValueError, match=r"already exists and is public.*Checked before training"):
        hub.check_push_config(True, public, None)
    hub.check_push_config(True, public, None, private=False)

    foreign = f"{USER}/someone-elses"
    api.create_repo(foreign, private=True)
    api.upload_file(path_or_fileobj=b"weights", path_in_repo="model.safetensors", repo_id=foreign)
    with pytest.raises(ValueError, match=r"not made by this tool .*--hub_overwrite_foreign_repo.*Checked before"):
        hub.check_push_config(True, "someone-elses", None)  # a bare name is the token's user's repo
    hub.check_push_config(True, foreign, None, overwrite_foreign_repo=True)


def test_check_push_config_without_push_needs_nothing(server, tmp_path):
    with client_for(server, tmp_path, token=None):
        hub.check_push_config(False, None, None)
    assert server.requests == []


@pytest.mark.parametrize(
    ("hub_model_id", "hub_token", "token", "expected"),
    [
        (None, None, TOKEN, r"--push_to_hub needs --hub_model_id.*e\.g\. --hub_model_id your-name/"),
        ("not a/valid/id", None, TOKEN, r"--hub_model_id 'not a/valid/id'"),
        (f"{USER}/blip", None, None, r"No Hugging Face token found: set HF_TOKEN .* or run `hf auth login`"),
        (f"{USER}/blip", OTHER_TOKEN, TOKEN, r"--hub_token is refused: .* set HF_TOKEN .* `hf auth login`"),
    ],
    ids=["no-hub-model-id", "bad-hub-model-id", "no-token", "token-on-the-command-line"],
)
def test_check_push_config_says_how_to_fix(server, tmp_path, hub_model_id, hub_token, token, expected):
    with client_for(server, tmp_path, token=token), pytest.raises(ValueError, match=expected) as raised:
        hub.check_push_config(True, hub_model_id, hub_token)
    assert OTHER_TOKEN not in str(raised.value)
    assert server.requests == []  # decided locally, before any request


def test_check_push_config_rejects_a_read_only_token(tmp_path):
    read_only = "hf_" + "ReadOnlyTokenForTheLocalTestServer"
    expected = "from HF_TOKEN is read-only: pushing needs a token with write access"
    with (
        HubServer(tokens={read_only: (USER, "read")}) as server,
        client_for(server, tmp_path, token=read_only),
        pytest.raises(ValueError, match=expected),
    ):
        hub.check_push_config(True, f"{USER}/blip", None)


def test_check_push_config_explains_offline_mode_and_unreachable_hubs(server, tmp_path):
    with client_for(server, tmp_path), pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set: unset it"):
            hub.check_push_config(True, f"{USER}/blip", None)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = SimpleNamespace(url=f"http://127.0.0.1:{probe.getsockname()[1]}")
    with client_for(closed, tmp_path), pytest.raises(ValueError, match=f"Cannot reach {closed.url}"):
        hub.check_push_config(True, f"{USER}/blip", None)


def test_the_allow_list_keeps_training_state_local(tmp_path):
    local = "training_args.bin optimizer.pt scheduler.pt rng_state.pth rng_state_0.pth pytorch_model.bin "
    local += "adapter_model.bin events.out.tfevents.1.host notes.txt Model.safetensors model.safetensors.bak"
    allowed = ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "chat_template.jinja", "vocab.json"]
    for name in local.split() + allowed:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-7" / "config.json").write_text("{}")
    assert hub.files_to_push(tmp_path) == sorted(allowed)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "events.out.tfevents.1.host").write_bytes(b"x")
    with pytest.raises(ValueError, match="holds none of the files a run writes"):
        hub.files_to_push(runs)
    with pytest.raises(ValueError, match="is not a folder"):
        hub.files_to_push(tmp_path / "missing")


# --- a training run, end to end: what a push shares ---------------------------------------------------------------

PRIVATE_HOME = "home-of-ada-lovelace"  # names of local folders that must not reach the Hub
PRIVATE_DATA = "holiday-photos-of-ada"
DATASET_FILES = {"samples.png", "predictions.jsonl", "data_report.json"}


@pytest.fixture(scope="module")
def trained(tiny_blip, tmp_path_factory):
    """``run_captioning.py --push_to_hub`` from a local base (tiny_blip, standing in for BASE_MODEL) and a local
    dataset folder with one broken image, HOME set to a folder with a personal name. The server stays up for later
    pushes of the same output_dir."""
    root = tmp_path_factory.mktemp("e2e")
    home = root / PRIVATE_HOME
    home.mkdir()
    data = make_caption_folder(root / PRIVATE_DATA)
    (data / "img_bad.png").write_text("not a png")  # skipped by the scan: an example with its path in data_report
    with (data / "metadata.jsonl").open("a") as metadata:
        metadata.write(json.dumps({"file_name": "img_bad.png", "caption": ["a broken picture"]}) + "\n")
    output = root / "run"
    repo = f"{USER}/blip-trained"
    flags = tiny_run_argv(
        tiny_blip,
        data,
        output,
        eval_baseline=True,
        max_new_tokens=4,
        max_bad_fraction=0.5,
        push_to_hub=True,
        hub_model_id=repo,
        base_model_id=BASE_MODEL,
        license="mit",
    )
    with HubServer() as server:
        proc = run_cli(
            *flags, server=server, home=root / "hf-home", script="run_captioning.py", env={"HOME": str(home)}
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert server.errors == []
        yield SimpleNamespace(server=server, proc=proc, repo=repo, output=output, data=data, home=home, root=root)


def download(server: HubServer, repo: str, folder: Path) -> dict[str, bytes]:
    """Every file of ``repo`` as the real client downloads it."""
    with client_for(server, folder / "hf-home"):
        local = Path(snapshot_download(repo, token=TOKEN, local_dir=folder / "download"))
    return {
        str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.is_file() and ".cache" not in p.parts
    }


def assert_no_local_names(files: dict[str, bytes], trained, tiny_blip: Path) -> None:
    """No absolute local path (the test machine's temporary folder included), no home-folder or dataset-folder name
    in any byte of any file."""
    top = "/" + Path(trained.root).parts[1] + "/"  # e.g. /tmp/
    for name, data in files.items():
        text = data.decode("utf-8", errors="replace")
        for local in (str(trained.root), str(tiny_blip), top, PRIVATE_HOME, PRIVATE_DATA):
            assert local not in text, (name, local)


def card_section(card: str, heading: str) -> str:
    start = card.index(heading)
    following = re.search(r"^#{1,3} ", card[start + len(heading) :], flags=re.M)
    return card[start : start + len(heading) + following.start()] if following else card[start:]


def test_a_training_run_pushes_no_local_path(trained, tiny_blip, tmp_path):
    files = download(trained.server, trained.repo, tmp_path)
    assert_no_local_names(files, trained, tiny_blip)
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == BASE_MODEL
    assert json.loads(files["captioning_config.json"])["base_model"] == BASE_MODEL
    local_state = json.loads((trained.output / "trainer_state.json").read_text())
    assert Path(local_state["best_model_checkpoint"]).parent == trained.output
    best = json.loads(files["trainer_state.json"])["best_model_checkpoint"]
    assert best == Path(local_state["best_model_checkpoint"]).name and best.startswith("checkpoint-")
    card = ModelCard(files["README.md"].decode())
    assert f'MODEL_ID = "{trained.repo}"' in card.text and f'BASE_ID = "{BASE_MODEL}"' in card.text
    assert card.data.base_model == BASE_MODEL and card.data.license == "mit"
    # The local files keep the local paths, for caption_images.py and merge_adapter.py on this machine.
    local_adapter = json.loads((trained.output / "adapter_config.json").read_text())
    assert local_adapter["base_model_name_or_path"] == str(tiny_blip)


def test_a_training_run_keeps_local_dataset_content_local_and_says_so(trained, tmp_path):
    stored = trained.server.repos[trained.repo]
    assert stored.private  # no --hub_private_repo given
    assert len(stored.commits) == 2  # the Hub's initial commit and ours: no checkpoint pushes by the Trainer
    pushed = set(stored.commits[-1].files) - {".gitattributes"}
    assert {p.name for p in trained.output.iterdir()} >= DATASET_FILES  # written, and kept local
    assert pushed == set(hub.files_to_push(trained.output)) - DATASET_FILES
    assert not pushed & {"training_args.bin", CARD_CONTEXT}
    card = stored.commits[-1].files["README.md"].content.decode()
    assert card_section(card, "### Dataset content in this repository").split("\n", 2)[2].strip() == (
        "None: no file derived from the training data (test images, captions, file names) is in this repository. "
        "The training data are local, and a push publishes their content only when asked (--push_samples)."
    )
    assert "Example predictions" not in card and "samples.png" not in card
    evaluation = json.loads((trained.output / "eval_results.json").read_text())
    cider = [result for result in ModelCard(card).data.eval_results if result.metric_type == "cider"]
    assert evaluation["eval_cider"] in {result.metric_value for result in cider}
    assert {result.dataset_name for result in ModelCard(card).data.eval_results} == {"local folder"}
    for text in (trained.proc.stdout, trained.proc.stderr):
        assert TOKEN not in text and not re.search(r"hf_[A-Za-z0-9]{30,}", text)


def test_push_to_hub_publishes_samples_when_asked_with_a_card_for_its_repo(trained, tiny_blip, tmp_path):
    repo = f"{USER}/other-name"
    proc = run_cli(
        str(trained.output),
        *("--hub_model_id", repo, "--base_model_id", BASE_MODEL, "--push_samples"),
        server=trained.server,
        home=tmp_path / "home",
        env={"HOME": str(trained.home)},
    )
    assert proc.returncode == 0, proc.stderr
    files = download(trained.server, repo, tmp_path)
    assert set(files) >= DATASET_FILES
    assert_no_local_names(files, trained, tiny_blip)
    report = json.loads(files["data_report.json"])
    examples = [example for split in report["splits"].values() for example in split["examples"]]
    assert [(example["image"], example["reason"]) for example in examples] == [("img_bad.png", "not_an_image")]
    assert list(report["sources"]) == ["--dataset_dir . (metadata.jsonl)"]
    card = files["README.md"].decode()
    assert f'MODEL_ID = "{repo}"' in card and card.count("\n# other-name\n") == 1
    assert ModelCard(card).data.model_name == "other-name"
    section = card_section(card, "### Dataset content in this repository")
    listed = re.findall(r"^- `([^`]+)`: (.+)$", section, flags=re.M)
    assert listed == list(hub.DATASET_FILES.items())
    assert "### Example predictions (test split)" in card and "](samples.png)" in card


def test_push_to_hub_needs_the_hub_id_of_a_local_base(trained, tiny_blip, tmp_path):
    before = len(trained.server.requests)
    proc = run_cli(str(trained.output), "--hub_model_id", f"{USER}/no-base-id", server=trained.server, home=tmp_path)
    assert proc.returncode == 1
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("push_to_hub.py: error:")]
    assert f"The base model is the local folder {tiny_blip}" in error and "--base_model_id" in error
    assert trained.server.requests[before:] == []


@pytest.mark.parametrize(("push_samples", "shared"), [(None, True), (False, False)], ids=["default", "false"])
def test_a_hub_dataset_run_publishes_its_samples_unless_told_not_to(trained, tmp_path, push_samples, shared):
    copy = tmp_path / "run"
    shutil.copytree(trained.output, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    context = json.loads((copy / CARD_CONTEXT).read_text())
    context["dataset"] = {"kind": "hub", "name": "someone/stickers", "config": None, "layout": None}
    (copy / CARD_CONTEXT).write_text(json.dumps(context))
    repo = f"{USER}/stickers-{push_samples}"
    with client_for(trained.server, tmp_path):
        hub.push_output_dir(copy, repo, base_model_id=BASE_MODEL, push_samples=push_samples)
    stored = trained.server.repos[repo].head.files
    assert DATASET_FILES & set(stored) == (DATASET_FILES if shared else set())
    card = stored["README.md"].content.decode()
    section = card_section(card, "### Dataset content in this repository")
    if shared:
        assert re.findall(r"^- `([^`]+)`", section, flags=re.M) == list(hub.DATASET_FILES)
    else:
        assert section.rstrip().endswith("is in this repository. The push was given --push_samples false.")
    assert ModelCard(card).data.datasets == ["someone/stickers"]


def test_a_push_from_a_local_base_without_its_hub_id_fails_before_training(tiny_blip, caption_folder, tmp_path):
    output = tmp_path / "run"
    argv = tiny_run_argv(tiny_blip, caption_folder, output, push_to_hub=True, hub_model_id=f"{USER}/blip")
    with pytest.raises(ValueError, match=f"The base model is the local folder {tiny_blip}.*pass --base_model_id"):
        run_captioning.main(argv)
    assert not output.exists()  # nothing trained, nothing written


# --- pushing into a repo that holds other files --------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_model_dir(run_dir, tmp_path_factory) -> Path:
    """A run that fine-tuned the whole model: weights and config.json instead of the adapter."""
    out = tmp_path_factory.mktemp("full") / "out"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("adapter_*", "checkpoint-*", "runs"))
    (out / "model.safetensors").write_bytes(b"full model weights" * 64)
    (out / "config.json").write_text(json.dumps({"model_type": "blip"}))
    return out


def commit_lines(server: HubServer) -> list[dict]:
    (last,) = commit_posts(server)[-1:]
    return [json.loads(line) for line in last.body.decode().splitlines()][1:]


def test_a_repo_this_tool_did_not_make_is_refused_unless_overwriting(run_dir, server, api):
    repo = f"{USER}/someone-elses-model"
    api.create_repo(repo, private=True)
    theirs = (
        ("model.safetensors", b"weights" * 64),
        ("config.json", b"{}"),
        ("README.md", b"---\nlicense: mit\n---\n"),
    )
    for name, data in theirs:
        api.upload_file(path_or_fileobj=data, path_in_repo=name, repo_id=repo)
    commits = len(commit_posts(server))
    with pytest.raises(
        RuntimeError,
        match=r"not made by this tool .*\(config.json, model.safetensors\).*"
        r"--hub_overwrite_foreign_repo.*Nothing was uploaded",
    ):
        hub.push_output_dir(run_dir, repo)
    assert len(commit_posts(server)) == commits

    hub.push_output_dir(run_dir, repo, overwrite_foreign_repo=True, push_samples=True)
    assert len(commit_posts(server)) == commits + 1  # one commit: the adapter in, the full model's weights out
    deleted = {line["value"]["path"] for line in commit_lines(server) if line["key"] == "deletedFile"}
    assert deleted == {"model.safetensors", "config.json"}
    assert set(server.repos[repo].head.files) - {".gitattributes"} == expected_files(run_dir)


def test_a_repo_holding_only_a_card_is_pushed_into(run_dir, server, api):
    repo = f"{USER}/card-only"
    api.create_repo(repo, private=True)
    api.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\n", path_in_repo="README.md", repo_id=repo)
    assert hub.push_output_dir(run_dir, repo, push_samples=True) is not None
    assert set(server.repos[repo].head.files) - {".gitattributes"} == expected_files(run_dir)


def test_pushing_one_kind_of_weights_deletes_the_other_in_the_same_commit(run_dir, full_model_dir, server, api):
    repo = f"{USER}/changing-kind"
    hub.push_output_dir(run_dir, repo, push_samples=True)
    hub.push_output_dir(full_model_dir, repo, push_samples=True)
    deleted = {line["value"]["path"] for line in commit_lines(server) if line["key"] == "deletedFile"}
    assert deleted == {"adapter_model.safetensors", "adapter_config.json"}
    files = set(server.repos[repo].head.files)
    assert {"model.safetensors", "config.json"} <= files and not files & deleted

    hub.push_output_dir(run_dir, repo, push_samples=True)  # and back
    deleted = {line["value"]["path"] for line in commit_lines(server) if line["key"] == "deletedFile"}
    assert deleted == {"model.safetensors", "config.json"}
    assert len(server.repos[repo].commits) == 4  # initial + three pushes, each one commit


def test_dataset_files_of_an_earlier_push_go_when_a_push_withholds_them(run_dir, server, api):
    repo = f"{USER}/samples-then-none"
    hub.push_output_dir(run_dir, repo, push_samples=True)
    assert set(server.repos[repo].head.files) >= DATASET_FILES
    hub.push_output_dir(run_dir, repo, push_samples=False)
    assert not DATASET_FILES & set(server.repos[repo].head.files)
    deleted = {line["value"]["path"] for line in commit_lines(server) if line["key"] == "deletedFile"}
    assert deleted == DATASET_FILES


# --- tokens --------------------------------------------------------------------------------------------------------

TOKEN_KINDS = {
    "user": "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
    "oauth": "hf_oauth_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123",
    "jwt": "hf_jwt_" + "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ0ZXN0ZXIifQ.c2lnbmF0dXJlLWJ5dGVz",
    "org": "api_org_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
}


@pytest.mark.parametrize("quoted", list(TOKEN_KINDS.values()), ids=list(TOKEN_KINDS))
def test_every_token_kind_is_kept_out_of_pushes_cards_and_errors(run_dir, server, api, tmp_path, quoted):
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    (leaky / "adapter_config.json").write_bytes((run_dir / "adapter_config.json").read_bytes())
    (leaky / "README.md").write_text(f"trained with `--hub_token={quoted}`\n")
    with pytest.raises(ValueError, match="README.md contains a Hugging Face token") as raised:
        hub.push_output_dir(leaky, f"{USER}/leaky")
    assert quoted not in str(raised.value)
    assert server.requests == []
    assert redact_tokens(f"token: {quoted}.") == "token: [REDACTED]."
    assert quoted not in hub._describe(RuntimeError(f"rejected {quoted}"), None)


def test_a_mistyped_token_flag_is_not_echoed(run_dir, server, tmp_path):
    base = ["--model_name_or_path", "m", "--dataset_dir", "d", "--output_dir", "o", "--do_train"]
    for typo in (["--hub_tokn", OTHER_TOKEN], [f"--hub_tokn={OTHER_TOKEN}"]):
        with pytest.raises(ValueError) as raised:
            parse_args([*base, *typo])
        assert str(raised.value).startswith(
            "Unknown flag(s): --hub_tokn (did you mean --hub_token?) (values not shown)"
        )
        assert OTHER_TOKEN not in str(raised.value)
    proc = run_cli(str(run_dir), "--hub_model_id", f"{USER}/x", "--hub_tokn", OTHER_TOKEN, server=server, home=tmp_path)
    assert proc.returncode == 1
    assert "push_to_hub.py: error: Unknown flag(s): --hub_tokn (did you mean --hub_token?)" in proc.stderr
    assert OTHER_TOKEN not in proc.stdout + proc.stderr
    assert server.requests == []
