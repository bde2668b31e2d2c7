"""``train.push_to_hub``: upload the exported sentence-transformers folder to the Hugging Face Hub.

``check_hub_access`` runs before any model work (``embedkit.run.build``): a repo id the Hub would refuse,
an offline environment (embedkit sets ``HF_HUB_OFFLINE=1`` unless ``EMBEDKIT_ONLINE=1``) or no token
(``huggingface_hub.get_token()``: ``HF_TOKEN`` or ``hf auth login``) stops the run with one message, so a
fine-tune does not run for an hour to fail at the upload. ``push_folder`` uploads once the folder and its
model card are complete (after ``results.json`` is written, so a failed upload loses no result).
"""

from __future__ import annotations

import os
from pathlib import Path

from embedkit.errors import EmbedkitError

__all__ = ["check_hub_access", "check_repo_id", "push_folder"]

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def check_repo_id(repo_id: str) -> None:
    """Raise ``EmbedkitError`` unless ``repo_id`` is a valid Hub model id with its owner (``owner/name``:
    the model card's usage snippet loads it by that id)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        reason = None if repo_id.count("/") == 1 else "the owner is missing"
    except HFValidationError as e:
        reason = str(e).splitlines()[0].split(". ")[0].rstrip(".")
    if reason:
        raise EmbedkitError(f"train.push_to_hub={repo_id!r} is not a Hub repo id ({reason}); give one like "
                            "your-name/my-embedder or an-org/my-embedder") from None


def check_hub_access(repo_id: str) -> None:
    """Raise ``EmbedkitError`` when an upload to ``repo_id`` cannot work here: offline, or no token."""
    import huggingface_hub

    check_repo_id(repo_id)
    offline = huggingface_hub.is_offline_mode() or any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE_VARS)
    if offline:
        why = ("embedkit runs offline unless EMBEDKIT_ONLINE=1 is set: it sets HF_HUB_OFFLINE=1"
               if os.environ.get("EMBEDKIT_ONLINE") != "1" else
               f"{' or '.join(v for v in _OFFLINE_VARS if os.environ.get(v))} is set in the environment")
        raise EmbedkitError(f"train.push_to_hub={repo_id}: the Hugging Face Hub cannot be reached offline ({why}). "
                            "Run with EMBEDKIT_ONLINE=1 and without HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE, or leave "
                            "train.push_to_hub unset and upload <run>/sentence-transformers later with "
                            f"`hf upload {repo_id} <run>/sentence-transformers .`")
    if huggingface_hub.get_token() is None:
        raise EmbedkitError(f"train.push_to_hub={repo_id}: no Hugging Face token found; log in with "
                            "`hf auth login` (or set HF_TOKEN to a token with write access) and re-run")


def push_folder(folder: str | os.PathLike, repo_id: str) -> str:
    """Create the model repo ``repo_id`` if needed and upload ``folder`` to it in one commit; returns the
    repo's URL. A failure (network, permissions) raises ``EmbedkitError`` saying how to upload later."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=f"embedkit export ({folder.parent.name})")
    except Exception as e:  # noqa: BLE001 (network, auth, permissions: the message names it; the folder is kept)
        first = str(e).splitlines()[0] if str(e) else ""
        raise EmbedkitError(f"train.push_to_hub={repo_id}: the upload failed ({type(e).__name__}: {first}); the "
                            f"folder {folder} is complete, upload it later with `hf upload {repo_id} {folder} .`"
                            ) from e
    return f"https://huggingface.co/{repo_id}"
