"""Fail fast when something must come from the Hugging Face Hub and cannot.

A hub id is only tried when it is not a local path. Offline mode (``HF_HUB_OFFLINE=1``) refuses at once;
otherwise one metadata request with a short timeout decides, so a run never hangs on retries and never
prints a download traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

HUB_TIMEOUT_S = 10.0


def hub_is_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def looks_local(path: str) -> bool:
    """A path that exists, or is written like a path (absolute, ./, ../, ~, or a file extension)."""
    p = Path(path).expanduser()
    return (
        p.exists() or path.startswith(("/", "./", "../", "~")) or p.suffix in (".jsonl", ".json", ".parquet")
    )


def hub_unreachable_reason(
    repo_id: str, repo_type: Literal["model", "dataset"], revision: str | None = None
) -> str | None:
    """``None`` when ``repo_id`` can be fetched from the hub now, else a short reason why not."""
    if hub_is_offline():
        return "the hub is offline here (HF_HUB_OFFLINE=1)"
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        if repo_type == "model":
            api.model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
        else:
            api.dataset_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as error:  # any failure means "cannot be had": say which, briefly
        text = str(error).strip().splitlines()
        first = text[0] if text else type(error).__name__
        return f"the hub did not answer for it ({type(error).__name__}: {first[:160]})"
    return None
