"""`uptrain push`: a converted (or uptrained) folder, with its model card, to a Hugging Face Hub repository.

The token comes from `--token`, else from huggingface_hub's own lookup (HF_TOKEN, then a stored login);
it is passed to the client only and scrubbed from every message printed.
"""

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .architectures import is_block_folder
from .card import card_for_folder, is_our_card
from .errors import UserError, first_line


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    files: list[tuple[str, int]]  # (path in the folder, bytes)
    card_written: bool  # False when README.md was written by someone else and is kept as it is


def model_folder(path: Path) -> Path:
    """The Block Transformer folder to publish: `path` itself, or the model a quickstart folder made."""
    path = Path(path)
    if is_block_folder(str(path)):
        return path
    summary = path / "summary.json"
    if summary.is_file():  # `uptrain quickstart OUT` made it: publish its uptrained model
        final = Path(json.loads(summary.read_text()).get("final_model", ""))
        if is_block_folder(str(final)):
            return final
    if not path.exists():
        raise UserError(f"model folder not found: {path}")
    raise UserError(f"{path} is not a Block Transformer folder (made by `uptrain convert` or `uptrain train`)")


def prepare(path: Path, repo_id: str) -> PushPlan:
    """Check the repository id, (re)write the model card and list what will be uploaded."""
    check_repo_id(repo_id)
    folder = model_folder(path)
    readme = folder / "README.md"
    card_written = not readme.is_file() or is_our_card(readme.read_text())
    if card_written:
        readme.write_text(card_for_folder(folder, repo_id))
    files = sorted(
        (str(file.relative_to(folder)), file.stat().st_size)
        for file in folder.rglob("*")
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(folder).parts)
    )
    return PushPlan(folder, repo_id, files, card_written)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"invalid repository id {repo_id!r}: {first_line(error)}") from None


def full_repo_id(repo_id: str, token: str | None = None) -> str:
    """`name` -> `user/name` for the token's user, as the Hub would create it; `owner/name` unchanged."""
    check_repo_id(repo_id)
    if "/" in repo_id:
        return repo_id
    with hub_errors(repo_id, token):
        return f"{_api(token).whoami()['name']}/{repo_id}"


def push(
    plan: PushPlan,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create the repository if needed and upload the folder; returns the commit URL."""
    api = _api(token)
    message = commit_message or f"Upload Block Transformer (block-uptrain {__version__})"
    with hub_errors(plan.repo_id, token):
        api.create_repo(plan.repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(plan.repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            folder_path=plan.folder, repo_id=plan.repo_id, revision=revision, commit_message=message,
            ignore_patterns=[".*", "**/.*"],
        )
    return str(getattr(commit, "commit_url", commit))


def _api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint(), token=token)


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None  # read now, not at import, so tests can point it anywhere


@contextmanager
def hub_errors(repo_id: str, token: str | None):
    """Any failure talking to the Hub -> one UserError line: refused (auth), unreachable, or what it said."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status in (401, 403):
            raise UserError(
                f"the Hub refused {repo_id} (HTTP {status}): check --token or HF_TOKEN and your write access"
            ) from None
        raise UserError(_scrub(f"push to {repo_id} failed: {first_line(error)}", token)) from None
    except Exception as error:
        if _is_network_error(error):
            where = _endpoint() or "https://huggingface.co"
            raise UserError(_scrub(f"cannot reach the Hub at {where}: {first_line(error)}", token)) from None
        raise UserError(_scrub(f"push to {repo_id} failed: {first_line(error)}", token)) from None


def _is_network_error(error: Exception) -> bool:
    """Connection refused, DNS, timeouts, TLS: whichever HTTP library this huggingface_hub uses (httpx, requests)."""
    names = {kind.__name__ for kind in type(error).__mro__}
    network = {"TransportError", "ConnectionError", "Timeout", "TimeoutException"}
    return isinstance(error, OSError) or bool(names & network)


def _scrub(text: str, token: str | None) -> str:
    secret = token or os.environ.get("HF_TOKEN")
    return text.replace(secret, "***") if secret else text
