"""Publishing a finished run on the Hugging Face Hub: which files of output_dir may leave the machine, where the token
comes from, the checks made before training, and a retried single-commit push."""

from __future__ import annotations

import fnmatch
import importlib
import logging
import os
import re
import shlex
import time
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import (
    HFValidationError,
    build_hf_headers,
    get_session,
    hf_raise_for_status,
    validate_repo_id,
)

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
# --hub_token) into training_args.bin; *.pt / *.pth are optimizer, scheduler and RNG states.
NEVER_PUSH_PATTERNS = ("training_args.bin", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "checkpoint-*", "runs")

DEFAULT_COMMIT_MESSAGE = "Upload fine-tuned captioner"
WHOAMI_TIMEOUT_S = 10.0
RETRY_BASE_DELAY_S = 2.0  # then 4 s, 8 s, ... (capped at 60 s)

_NO_TOKEN = (
    "No Hugging Face token found: set HF_TOKEN to a write token (https://huggingface.co/settings/tokens) or run "
    "`hf auth login` once."
)
_TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{30,}")
_TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".jinja")


def resolve_token() -> str | None:
    """The token huggingface_hub itself would use: HF_TOKEN (or its older names, or an OIDC exchange when
    HF_OIDC_RESOURCE is set) from the environment, else the one `hf auth login` stored. Never from the command line."""
    return get_token()


def check_push_config(push_to_hub: bool, hub_model_id: str | None, hub_token: str | None) -> None:
    """Checks run before training, so that a push that cannot succeed fails in seconds rather than after the run.

    Refuses ``--hub_token`` whether or not a push is asked for (it would be pickled into training_args.bin). With
    ``push_to_hub``: needs a valid ``hub_model_id`` and a token, and asks the Hub (``whoami``) whether the token is
    accepted and may write. Raises ValueError saying how to fix each case.
    """
    if hub_token:
        raise ValueError(
            "--hub_token is refused: a token given on the command line is pickled into output_dir/training_args.bin "
            "and shows in process lists and shell history. Drop it and set HF_TOKEN in the environment, or run "
            "`hf auth login` once."
        )
    if not push_to_hub:
        if hub_model_id:
            logger.warning("--hub_model_id %s is ignored without --push_to_hub.", hub_model_id)
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
    token = resolve_token()
    if token is None:
        raise ValueError(_NO_TOKEN)
    user = _whoami(token)
    logger.info(
        "Hub token accepted by %s (user %s); the run will be pushed to %s.", constants.ENDPOINT, user, hub_model_id
    )


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


def push_output_dir(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    max_attempts: int = 3,
) -> str | None:
    """Upload the allow-listed files of ``output_dir`` to the model repo ``repo_id`` in one commit.

    The repo is created when missing: private if ``private`` is True, public if False, the account's default if None
    (an existing repo keeps its visibility; a public one is refused when ``private`` is True). Connection errors,
    5xx and 429 are retried with exponential backoff, up to ``max_attempts`` tries in all; other errors (401, 403,
    ...) are not. ``token`` defaults to :func:`resolve_token`. Returns the commit URL, or None when the repo already
    held these exact files (the Hub makes no empty commit). On failure raises RuntimeError naming the command that
    retries; output_dir is only ever read.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts {max_attempts}: must be at least 1.")
    output_dir = Path(output_dir)
    names = files_to_push(output_dir)
    token = token or resolve_token()
    if token is None:
        raise ValueError(_NO_TOKEN)
    _refuse_files_holding_token(output_dir, names, token)

    kept = sorted(f"{p.name}/" if p.is_dir() else p.name for p in output_dir.iterdir() if p.name not in names)
    visibility = {True: "private", False: "public", None: "default visibility"}[private]
    logger.info(
        "Pushing %d file(s) of %s to %s (%s): %s", len(names), output_dir, repo_id, visibility, ", ".join(names)
    )
    if kept:
        logger.info("Kept local (not in the push allow-list): %s", ", ".join(kept))

    retry = retry_command(output_dir, repo_id, private=bool(private))
    attempt = 0
    while True:
        attempt += 1
        try:
            return _push_once(HfApi(token=token), output_dir, names, repo_id, private, commit_message)
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


def retry_command(output_dir: str | Path, repo_id: str, *, private: bool = False) -> str:
    """The command line that pushes ``output_dir`` again without retraining."""
    command = f"python push_to_hub.py {shlex.quote(str(output_dir))} --hub_model_id {shlex.quote(repo_id)}"
    return command + (" --hub_private_repo" if private else "")


class _PushRefused(Exception):
    """A push that must not happen and that retrying cannot fix."""


def _push_once(
    api: HfApi, output_dir: Path, names: list[str], repo_id: str, private: bool | None, commit_message: str
) -> str | None:
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # "name" becomes "user/name"
    info = api.repo_info(repo_id)
    if private and not info.private:
        raise _PushRefused(
            f"{repo_id} already exists and is public, but --hub_private_repo asks for a private repo: make it "
            f"private in its settings on {api.endpoint}, or push without --hub_private_repo."
        )
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(output_dir / name)) for name in names]
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


def _refuse_files_holding_token(output_dir: Path, names: list[str], token: str) -> None:
    """A card or results file quoting a token (a pasted command line, say) would publish it: refuse. Checks the text
    files for the token in use and for anything shaped like a Hugging Face token (``hf_`` + 30 or more letters)."""
    for name in names:
        path = output_dir / name
        if not name.endswith(_TEXT_SUFFIXES):
            continue
        data = path.read_bytes()
        if token.encode() in data or _TOKEN_SHAPE.search(data.decode("utf-8", errors="replace")):
            raise ValueError(
                f"Refusing to push: {path} contains a Hugging Face token (hf_...). Remove it from the file (and "
                "revoke the token at https://huggingface.co/settings/tokens if the file was shared), then push again."
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
    return " ".join(_TOKEN_SHAPE.sub("hf_***", text).split())
