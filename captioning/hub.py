"""Publishing a finished run on the Hugging Face Hub: which files of output_dir may leave the machine and in what
form (no local paths, dataset content only when asked), where the token comes from, the checks made before training,
and a retried single-commit push."""

from __future__ import annotations

import fnmatch
import importlib
import json
import logging
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import (
    HFValidationError,
    build_hf_headers,
    get_session,
    hf_raise_for_status,
    validate_repo_id,
)

from captioning.model_card import (
    CARD_CONTEXT,
    README,
    is_hub_id,
    load_card_context,
    publication_context,
    render_model_card,
)
from captioning.outputs import CAPTIONING_CONFIG
from captioning.redaction import TOKEN_PATTERN
from captioning.space_app import space_files

logger = logging.getLogger(__name__)

# Top-level files of output_dir that are pushed; everything else stays local. Patterns are shell globs matched
# case-sensitively against file names (no folders: checkpoint-*/ and runs/ never leave the machine).
PUSH_ALLOW_PATTERNS = (
    # LoRA adapter
    "adapter_model.safetensors",
    "adapter_config.json",
    # full model (single file or shards)
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    # processor: image processor and tokenizer
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "chat_template*.json",
    "chat_template*.jinja",
    # model card and its figures
    "README.md",
    "training_curves.png",
    "samples.png",
    # results and what inference needs to caption like training did
    "train_results.json",
    "eval_results.json",
    "predict_results.json",
    "all_results.json",
    "baseline_results.json",
    "captioning_config.json",
    "data_report.json",
    "predictions.jsonl",
    "trainer_state.json",
)

# Never pushed, even if a future allow-list pattern matched: transformers pickles the training arguments (with any
# --hub_token) into training_args.bin; *.pt / *.pth are optimizer, scheduler and RNG states; card_context.json holds
# the run's local paths (the push renders the card from it).
NEVER_PUSH_PATTERNS = (
    "training_args.bin",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.pkl",
    "*.pickle",
    "checkpoint-*",
    "runs",
    CARD_CONTEXT,
)

# Files that hold the training data's content (test images, reference captions, file names): pushed only with
# --push_samples (default: on for a public Hub dataset, off for local data). Name -> what the model card says it holds.
DATASET_FILES = {
    "samples.png": "test images with their fine-tuned, baseline and reference captions",
    "predictions.jsonl": "every test image's name, its generated caption and all of its reference captions",
    "data_report.json": "counts of the images and captions left out before training, with examples (file names "
    "relative to the dataset folder, caption text)",
}

# Weights of the two kinds a run pushes. A repo keeps one kind: pushing one deletes the other's files (and stale
# shards of the same kind) in the same commit, or transformers and peft would load the wrong one.
WEIGHT_PATTERNS = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "adapter_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "config.json",
    "generation_config.json",
)
# Files a repo made by anyone may hold without counting as someone else's work.
_NEUTRAL_REPO_FILES = {".gitattributes", "README.md"}
# Vocabulary files are copied as they are: they hold no paths, and a path-like entry must not be rewritten.
_VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model")
# JSON fields that name the base model: a push writes its Hub id there (field name per file).
_BASE_MODEL_FIELDS = {"adapter_config.json": "base_model_name_or_path", CAPTIONING_CONFIG: "base_model"}

DEFAULT_COMMIT_MESSAGE = "Upload fine-tuned captioner"
WHOAMI_TIMEOUT_S = 10.0
RETRY_BASE_DELAY_S = 2.0  # then 4 s, 8 s, ... (capped at 60 s)

_NO_TOKEN = (
    "No Hugging Face token found: set HF_TOKEN to a write token (https://huggingface.co/settings/tokens) or run "
    "`hf auth login` once."
)
_TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".jinja")


def resolve_token() -> str | None:
    """The token huggingface_hub itself would use: HF_TOKEN (or its older names, or an OIDC exchange when
    HF_OIDC_RESOURCE is set) from the environment, else the one `hf auth login` stored. Never from the command line."""
    return get_token()


def check_push_config(
    push_to_hub: bool,
    hub_model_id: str | None,
    hub_token: str | None,
    *,
    base_model: str | None = None,
    base_model_id: str | None = None,
    private: bool = True,
    overwrite_foreign_repo: bool = False,
) -> None:
    """Checks run before training, so that a push that cannot succeed fails in seconds rather than after the run.

    Refuses ``--hub_token`` whether or not a push is asked for (it would be pickled into training_args.bin). With
    ``push_to_hub``: needs a valid ``hub_model_id``, a Hub id for the base model (``base_model`` itself, or
    ``base_model_id`` when the base is a local folder) and a token, and asks the Hub (``whoami``) whether the token is
    accepted and may write, and whether an existing ``hub_model_id`` repo would refuse the push (public while
    ``private`` is asked, or made by someone else without ``overwrite_foreign_repo``). Raises ValueError saying how to
    fix each case.
    """
    if hub_token:
        raise ValueError(
            "--hub_token is refused: a token given on the command line is pickled into output_dir/training_args.bin "
            "and shows in process lists and shell history. Drop it and set HF_TOKEN in the environment, or run "
            "`hf auth login` once."
        )
    if not push_to_hub:
        for flag, value in (("--hub_model_id", hub_model_id), ("--base_model_id", base_model_id)):
            if value:
                logger.warning("%s %s is ignored without --push_to_hub.", flag, value)
        return
    if not hub_model_id:
        raise ValueError(
            "--push_to_hub needs --hub_model_id, the Hub repository to create or update "
            "(e.g. --hub_model_id your-name/blip-captions-lora)."
        )
    try:
        validate_repo_id(hub_model_id)
    except HFValidationError as error:
        raise ValueError(f"--hub_model_id {hub_model_id!r}: {error}") from None
    resolve_base_model_id([base_model] if base_model else [], base_model_id)
    token = resolve_token()
    if token is None:
        raise ValueError(_NO_TOKEN)
    user = _whoami(token)
    repo_id = hub_model_id if "/" in hub_model_id or not user else f"{user}/{hub_model_id}"
    _check_existing_repo(token, repo_id, private=private, overwrite_foreign_repo=overwrite_foreign_repo)
    logger.info("Hub token accepted by %s (user %s); the run will be pushed to %s.", constants.ENDPOINT, user, repo_id)


def resolve_base_model_id(base_models: list[str], base_model_id: str | None) -> str | None:
    """The Hub id a push writes for the base model: ``base_model_id`` (checked) when given, else the run's base when
    it is a Hub id. ``base_models`` are the names the run's files give it. Raises ValueError naming
    ``--base_model_id`` when a base is a local folder and no Hub id is given: a push would publish its path."""
    if base_model_id:
        try:
            validate_repo_id(base_model_id)
        except HFValidationError as error:
            raise ValueError(f"--base_model_id {base_model_id!r}: give the base model's Hub id ({error}).") from None
        return base_model_id
    local = [name for name in base_models if name and not is_hub_id(name)]
    if local:
        raise ValueError(
            f"The base model is the local folder {local[0]}, and a push must not publish local paths: pass "
            "--base_model_id with the Hub id it was downloaded from (e.g. --base_model_id "
            "Salesforce/blip-image-captioning-base). adapter_config.json, captioning_config.json and the model "
            "card on the Hub then name that id; the local files keep the folder."
        )
    return next((name for name in base_models if name), None)


def files_to_push(output_dir: str | Path) -> list[str]:
    """Names of the top-level files of ``output_dir`` that the allow-list lets out, sorted. Raises ValueError when
    ``output_dir`` is not a folder or holds none of them."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ValueError(f"Nothing to push: {output_dir} is not a folder (give a finished run's output_dir).")
    names = sorted(path.name for path in output_dir.iterdir() if path.is_file() and _allowed(path.name))
    if not names:
        raise ValueError(
            f"Nothing to push: {output_dir} holds none of the files a run writes (adapter or model, processor, "
            "README.md, results). Give a finished run's output_dir."
        )
    return names


@dataclass
class StagedPush:
    """What a push uploads: file name -> its bytes when rewritten for the Hub, or the local file when sent as is.
    ``withheld`` are the dataset-derived files kept local (no --push_samples)."""

    files: dict[str, bytes | Path]
    withheld: list[str]
    base_model_id: str | None
    card_rendered: bool  # README.md rendered again for the repo (False: pushed as written, no card_context.json)


def stage_push(
    output_dir: str | Path,
    repo_id: str,
    *,
    base_model_id: str | None = None,
    push_samples: bool | None = None,
    push_app: bool = False,
) -> StagedPush:
    """The files of ``output_dir`` as they are published to ``repo_id``, written in memory; output_dir is only read.

    Local folders never leave the machine: output_dir itself keeps its local paths (adapter_config.json's
    ``base_model_name_or_path`` must still load the base with caption_images.py and merge_adapter.py there), and the
    push rewrites its copy: the base model's Hub id (``base_model_id``, or the base itself when it is a Hub id) where
    the base's path was, paths below output_dir and the dataset folders relative to them (trainer_state.json's
    ``best_model_checkpoint``, data_report.json's image paths), the home folder as ``~``. The model card is rendered
    again for ``repo_id`` (``MODEL_ID``, ``BASE_ID``, no local dataset name, a section saying which dataset-derived
    files are pushed). samples.png, predictions.jsonl and data_report.json go only with ``push_samples`` (None: on
    for a Hub dataset, off for local data). ``push_app`` adds a Spaces-ready app.py and its requirements.txt
    (captioning/space_app.py).
    """
    output_dir = Path(output_dir)
    names = files_to_push(output_dir)
    context = load_card_context(output_dir)
    configs = {name: _read_json_object(output_dir / name) for name in _BASE_MODEL_FIELDS}
    base_models = [str(configs[name].get(key) or "") for name, key in _BASE_MODEL_FIELDS.items()]
    if not any(base_models) and context is not None:  # a folder without configs: the card's word for it
        base_models = [context.base_model]
    base_model_id = resolve_base_model_id(base_models, base_model_id)
    if context is not None:  # what the card names (the checkpoint training started from) must go too
        base_models.append(context.base_model)

    share, note = _share_dataset_files(push_samples, context)
    shared = {name: description for name, description in DATASET_FILES.items() if share and name in names}
    if share and not shared:
        note = f"The run wrote none of {', '.join(DATASET_FILES)}."
    withheld = [name for name in names if name in DATASET_FILES and name not in shared]
    local = _LocalPaths.of_run(output_dir, base_models, base_model_id, context.data_paths if context else [])

    files: dict[str, bytes | Path] = space_files(output_dir, repo_id) if push_app else {}
    for name in names:
        path = output_dir / name
        if name in withheld:
            continue
        if name == README and context is not None:
            card = publication_context(
                context, repo_id=repo_id, base_model_id=base_model_id, shared_data_files=shared, shared_data_note=note
            )
            files[name] = local.scrub(render_model_card(card, output_dir)).encode()
        elif name in _VOCABULARY_FILES or not name.endswith(_TEXT_SUFFIXES):
            files[name] = path
        elif name.endswith((".json", ".jsonl")):
            files[name] = _scrub_json(path, local, base_model_id)
        else:
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
            scrubbed = local.scrub(text)
            files[name] = path if scrubbed == text else scrubbed.encode("utf-8", errors="surrogateescape")
    return StagedPush(files, withheld, base_model_id, card_rendered=README in files and context is not None)


def push_output_dir(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    base_model_id: str | None = None,
    push_samples: bool | None = None,
    push_app: bool = False,
    overwrite_foreign_repo: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    max_attempts: int = 3,
) -> str | None:
    """Upload the allow-listed files of ``output_dir``, as :func:`stage_push` writes them, to the model repo
    ``repo_id`` in one commit.

    The repo is created when missing, private unless ``private`` is False (an existing repo keeps its visibility; a
    public one is refused when ``private`` is True). A repo that this tool did not make (no captioning_config.json)
    and that holds files besides .gitattributes and README.md is refused unless ``overwrite_foreign_repo``. Weights
    in the repo that this push does not carry (the other kind: a full model where an adapter is pushed or the
    reverse, or stale shards) are deleted in the same commit, and so are dataset-derived files of an earlier push
    that this one withholds. Connection errors, 5xx and 429 are retried with exponential backoff, up to
    ``max_attempts`` tries in all; other errors (401, 403, ...) are not. ``token`` defaults to
    :func:`resolve_token`. Returns the commit URL, or None when the repo already held these exact files (the Hub
    makes no empty commit). On failure raises RuntimeError naming the command that retries; output_dir is only ever
    read.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts {max_attempts}: must be at least 1.")
    output_dir = Path(output_dir)
    staged = stage_push(output_dir, repo_id, base_model_id=base_model_id, push_samples=push_samples, push_app=push_app)
    token = token or resolve_token()
    if token is None:
        raise ValueError(_NO_TOKEN)
    _refuse_files_holding_token(output_dir, staged.files, token)

    names = sorted(staged.files)
    kept = sorted(f"{p.name}/" if p.is_dir() else p.name for p in output_dir.iterdir() if p.name not in names)
    kept = [name for name in kept if name not in staged.withheld]
    rewritten = [name for name in names if isinstance(staged.files[name], bytes)]
    logger.info(
        "Pushing %d file(s) of %s to %s (%s): %s",
        len(names),
        output_dir,
        repo_id,
        "private" if private else "public",
        ", ".join(names),
    )
    if rewritten:
        logger.info("Written for the Hub, without local paths (the local files keep them): %s", ", ".join(rewritten))
    if README in staged.files and not staged.card_rendered:
        logger.warning(
            "%s has no readable %s: README.md is pushed as written, not rendered again for %s.",
            output_dir,
            CARD_CONTEXT,
            repo_id,
        )
    if staged.withheld:
        logger.info("Kept local (dataset content; --push_samples publishes it): %s", ", ".join(staged.withheld))
    if kept:
        logger.info("Kept local (not in the push allow-list): %s", ", ".join(kept))

    retry = retry_command(
        output_dir,
        repo_id,
        private=private,
        base_model_id=base_model_id,
        push_samples=push_samples,
        push_app=push_app,
        overwrite_foreign_repo=overwrite_foreign_repo,
    )
    attempt = 0
    while True:
        attempt += 1
        try:
            return _push_once(HfApi(token=token), staged, repo_id, private, commit_message, overwrite_foreign_repo)
        except _PushRefused as error:
            raise RuntimeError(f"{error} Nothing was uploaded; {output_dir} is intact.") from None
        except Exception as error:
            reason = _describe(error, token)
            if attempt < max_attempts and _is_transient(error):
                delay = _retry_delay(error, attempt)
                logger.warning(
                    "Push attempt %d/%d failed (%s); retrying in %.0f s.", attempt, max_attempts, reason, delay
                )
                time.sleep(delay)
                continue
            tries = f" after {attempt} attempts" if attempt > 1 else ""
            raise RuntimeError(
                f"Pushing {output_dir} to {repo_id} failed{tries}: {reason}. The output directory {output_dir} is "
                f"intact; once the cause is fixed, retry with: {retry}"
            ) from None


def retry_command(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    base_model_id: str | None = None,
    push_samples: bool | None = None,
    push_app: bool = False,
    overwrite_foreign_repo: bool = False,
) -> str:
    """The command line that pushes ``output_dir`` again without retraining, with the same choices."""
    command = f"python push_to_hub.py {shlex.quote(str(output_dir))} --hub_model_id {shlex.quote(repo_id)}"
    if not private:
        command += " --hub_private_repo false"
    if base_model_id:
        command += f" --base_model_id {shlex.quote(base_model_id)}"
    if push_samples is not None:
        command += f" --push_samples {str(push_samples).lower()}"
    if push_app:
        command += " --push_app"
    if overwrite_foreign_repo:
        command += " --hub_overwrite_foreign_repo"
    return command


def repo_refusal(info, repo_id: str, *, private: bool, overwrite_foreign_repo: bool) -> str | None:
    """Why a push into the existing repo ``info`` must not happen (None: it may): a public repo when a private one is
    asked for, or a repo this tool did not make that holds other files (without ``overwrite_foreign_repo``)."""
    if private and not info.private:
        return (
            f"{repo_id} already exists and is public, but the push asks for a private repo (--hub_private_repo, the "
            f"default): make it private in its settings on {constants.ENDPOINT}, or push with --hub_private_repo "
            "false to keep it public."
        )
    existing = {sibling.rfilename for sibling in info.siblings or []}
    others = sorted(existing - _NEUTRAL_REPO_FILES)
    if CAPTIONING_CONFIG not in existing and others and not overwrite_foreign_repo:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        return (
            f"{repo_id} was not made by this tool (it has no {CAPTIONING_CONFIG}) and holds other files ({shown}): "
            "push to a new repo (another --hub_model_id), or pass --hub_overwrite_foreign_repo to push into it "
            "anyway (its files of the same names are replaced, its weights deleted)."
        )
    return None


def _check_existing_repo(token: str, repo_id: str, *, private: bool, overwrite_foreign_repo: bool) -> None:
    """Before training: refuse now a push that the existing repo would refuse after training. A repo that does not
    exist yet is created at push time; when the Hub cannot say, the push checks again."""
    try:
        info = HfApi(token=token).repo_info(repo_id)
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status != 404:
            logger.warning("Could not look %s up before training (%s); the push checks it.", repo_id, status)
        return
    except (*_transport_errors(), ConnectionError, TimeoutError):
        logger.warning("Could not look %s up before training; the push checks it.", repo_id)
        return
    refusal = repo_refusal(info, repo_id, private=private, overwrite_foreign_repo=overwrite_foreign_repo)
    if refusal is not None:
        raise ValueError(f"{refusal} (Checked before training; nothing was trained or uploaded.)")


class _PushRefused(Exception):
    """A push that must not happen and that retrying cannot fix."""


def _push_once(
    api: HfApi,
    staged: StagedPush,
    repo_id: str,
    private: bool,
    commit_message: str,
    overwrite_foreign_repo: bool,
) -> str | None:
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # "name" becomes "user/name"
    info = api.repo_info(repo_id)
    refusal = repo_refusal(info, repo_id, private=private, overwrite_foreign_repo=overwrite_foreign_repo)
    if refusal is not None:
        raise _PushRefused(refusal)
    existing = {sibling.rfilename for sibling in info.siblings or []}
    ours = CAPTIONING_CONFIG in existing
    stale = sorted(
        name
        for name in existing - set(staged.files)
        if any(fnmatch.fnmatchcase(name, p) for p in WEIGHT_PATTERNS) or (ours and name in DATASET_FILES)
    )
    if stale:
        logger.info(
            "Deleting from %s in the same commit (weights this push replaces, withheld data): %s",
            repo_id,
            ", ".join(stale),
        )
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes) else str(content))
        for name, content in sorted(staged.files.items())
    ]
    operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
    commit = api.create_commit(repo_id, operations, commit_message=commit_message)
    if info.sha is not None and commit.oid == info.sha:
        logger.info("Nothing to push: %s already holds these exact files (commit %s).", repo_id, info.sha)
        return None
    logger.info("Pushed %s", commit.commit_url)
    return commit.commit_url


def _allowed(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in PUSH_ALLOW_PATTERNS) and not any(
        fnmatch.fnmatchcase(name, p) for p in NEVER_PUSH_PATTERNS
    )


def _share_dataset_files(push_samples: bool | None, context) -> tuple[bool, str | None]:
    """Whether the dataset-derived files go with the push, and the card's note when they do not."""
    if push_samples is not None:
        return push_samples, "The push was given --push_samples false." if not push_samples else None
    if context is not None and context.dataset.hub_id:
        return True, None
    if context is None:
        return False, "Where the training data came from is not recorded, so they are treated as local data."
    return False, ("The training data are local, and a push publishes their content only when asked (--push_samples).")


class _LocalPaths:
    """Local folders and what a pushed file says instead: a Hub id for the base model's folder, nothing for
    output_dir and the dataset folders (paths below them become relative), ``~`` for the home folder."""

    def __init__(self, replacements: dict[str, str]):
        self._rules = [
            (re.compile(r"(?<![\w.\-/])" + re.escape(path) + r"(?:(/)|(?![\w.\-]))"), replacement)
            for path, replacement in sorted(replacements.items(), key=lambda item: -len(item[0]))
        ]

    @classmethod
    def of_run(
        cls, output_dir: Path, base_models: list[str], base_model_id: str | None, data_paths: list[str]
    ) -> _LocalPaths:
        replacements: dict[str, str] = {}

        def add(path: str, replacement: str) -> None:
            if not path or "://" in path:
                return
            forms = {os.path.abspath(os.path.expanduser(path))}
            if "/" in path.strip("/"):  # as written, when it is more than one word (a bare "data" is no path)
                forms.add(path.rstrip("/"))
            for form in forms:
                if form not in ("", "/", "."):
                    replacements.setdefault(form, replacement)

        for base in base_models:
            if base and not is_hub_id(base):
                add(base, base_model_id or "")
        add(str(output_dir), "")
        for path in data_paths:
            add(path, "")
        home = os.path.expanduser("~")
        if len(Path(home).parts) >= 3:  # /home/name, /Users/name: the name is personal; /root is not
            replacements.setdefault(home, "~")
        return cls(replacements)

    def scrub(self, text: str) -> str:
        for pattern, replacement in self._rules:
            text = pattern.sub(
                lambda match, new=replacement: (f"{new}/" if new else "") if match.group(1) else (new or "."), text
            )
        return text

    def scrub_value(self, value, changed: list[bool]):
        """``value`` (parsed JSON) with every string scrubbed; ``changed[0]`` becomes True when one changed."""
        if isinstance(value, str):
            new = self.scrub(value)
            changed[0] |= new != value
            return new
        if isinstance(value, list):
            return [self.scrub_value(item, changed) for item in value]
        if isinstance(value, dict):
            return {self.scrub_value(key, changed): self.scrub_value(item, changed) for key, item in value.items()}
        return value


def _scrub_json(path: Path, local: _LocalPaths, base_model_id: str | None) -> bytes | Path:
    """A JSON / JSON-lines file without local paths: the bytes to push, or ``path`` when nothing had to change.
    Strings are scrubbed after parsing (escapes and all); a file that does not parse is scrubbed as text."""
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    changed = [False]
    try:
        if path.suffix == ".jsonl":
            lines = [
                json.dumps(local.scrub_value(json.loads(line), changed), ensure_ascii=False) if line.strip() else line
                for line in text.splitlines()
            ]
            return ("\n".join(lines) + "\n").encode() if changed[0] else path
        data = local.scrub_value(json.loads(text), changed)
    except ValueError:
        scrubbed = local.scrub(text)
        return path if scrubbed == text else scrubbed.encode("utf-8", errors="surrogateescape")
    if isinstance(data, dict):
        field = _BASE_MODEL_FIELDS.get(path.name)
        if field and base_model_id and data.get(field) and data[field] != base_model_id:
            data[field], changed[0] = base_model_id, True
        if path.name == "trainer_state.json" and data.get("best_model_checkpoint"):
            name = Path(data["best_model_checkpoint"]).name  # checkpoints stay local: their name says which it was
            changed[0] |= name != data["best_model_checkpoint"]
            data["best_model_checkpoint"] = name
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode() if changed[0] else path


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _refuse_files_holding_token(output_dir: Path, files: dict[str, bytes | Path], token: str) -> None:
    """A card or results file quoting a token (a pasted command line, say) would publish it: refuse. Checks the text
    files, as they would be pushed, for the token in use and for anything shaped like a Hugging Face token
    (captioning.redaction.TOKEN_PATTERN)."""
    for name, content in files.items():
        if not name.endswith(_TEXT_SUFFIXES):
            continue
        data = content if isinstance(content, bytes) else content.read_bytes()
        if token.encode() in data or TOKEN_PATTERN.search(data.decode("utf-8", errors="replace")):
            raise ValueError(
                f"Refusing to push: {output_dir / name} contains a Hugging Face token (hf_...). Remove it from the "
                "file (and revoke the token at https://huggingface.co/settings/tokens if the file was shared), then "
                "push again."
            )


def _whoami(token: str) -> str | None:
    """Ask the Hub who the token belongs to; raise ValueError when it is rejected, read-only or unreachable."""
    endpoint = constants.ENDPOINT
    source = _token_source()
    try:
        response = get_session().get(
            f"{endpoint}/api/whoami-v2", headers=build_hf_headers(token=token), timeout=WHOAMI_TIMEOUT_S
        )
        hf_raise_for_status(response)
    except OfflineModeIsEnabled:
        raise ValueError(
            "--push_to_hub needs the Hub but HF_HUB_OFFLINE is set: unset it, or train without --push_to_hub and "
            "push the finished run later with push_to_hub.py."
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise ValueError(
                f"The Hugging Face token from {source} was rejected by {endpoint} (401 Unauthorized): set HF_TOKEN "
                "to a valid write token (https://huggingface.co/settings/tokens) or run `hf auth login`."
            ) from None
        raise ValueError(
            f"Could not check the Hugging Face token with {endpoint}: {_describe(error, token)}. Try again later, or "
            "train without --push_to_hub and push the finished run later with push_to_hub.py."
        ) from None
    except (*_transport_errors(), ConnectionError, TimeoutError) as error:
        raise ValueError(
            f"Cannot reach {endpoint} to check the Hugging Face token ({_describe(error, token)}): check the network "
            "and HF_ENDPOINT, or train without --push_to_hub and push the finished run later with push_to_hub.py."
        ) from None
    info = response.json()
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise ValueError(
            f"The Hugging Face token from {source} is read-only: pushing needs a token with write access "
            "(https://huggingface.co/settings/tokens); set HF_TOKEN to it or run `hf auth login`."
        )
    return info.get("name")


def _token_source() -> str:
    if os.environ.get("HF_OIDC_RESOURCE"):
        return "the OIDC exchange (HF_OIDC_RESOURCE)"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(name, "").strip():
            return name
    return f"the login store ({constants.HF_TOKEN_PATH})"


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the HTTP library huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    errors = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _causes(error: BaseException):
    seen = 0
    while error is not None and seen < 8:
        yield error
        error = error.__cause__ or error.__context__
        seen += 1


def _is_transient(error: BaseException) -> bool:
    """Worth retrying: connection errors, timeouts, 5xx and 429 (also when wrapped, as LFS upload errors are)."""
    for cause in _causes(error):
        if isinstance(cause, OfflineModeIsEnabled):
            return False
        if isinstance(cause, HfHubHTTPError):
            status = cause.response.status_code if cause.response is not None else None
            return status is not None and (status in (408, 429) or status >= 500)
        if isinstance(cause, (*_transport_errors(), ConnectionError, TimeoutError)):
            return True
    return False


def _retry_delay(error: BaseException, attempt: int) -> float:
    delay = RETRY_BASE_DELAY_S * 2 ** (attempt - 1)
    for cause in _causes(error):
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            retry_after = cause.response.headers.get("Retry-After", "")
            if retry_after.isdigit():
                delay = max(delay, float(retry_after))
            break
    return min(delay, 60.0)


def _describe(error: BaseException, token: str | None) -> str:
    """One line naming the error, with the token (or anything shaped like one) masked."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if token:
        text = text.replace(token, "hf_***")
    return " ".join(TOKEN_PATTERN.sub("hf_***", text).split())
