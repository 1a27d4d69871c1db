"""One folder per benchmark, each a Hugging Face ``evaluate`` module that scores predictions without
generating anything (``evaluate.load("evaluators/gsm8k")``, or :func:`load`). Generation and the
``fedalign eval`` command live in :mod:`fedalign`; prompts and scoring rules live here, declared in each
folder's ``bench.yaml`` and card (README.md)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def available() -> list[str]:
    """The benchmarks: every folder holding a module of its own name."""
    return sorted(p.name for p in ROOT.iterdir() if (p / f"{p.name}.py").is_file())


def path(name: str) -> Path:
    if name not in available():
        raise KeyError(f"unknown benchmark {name!r} (available: {', '.join(available())})")
    return ROOT / name


def load(name: str):
    """The benchmark's ``evaluate`` module, loaded from this folder by path (never from a hub)."""
    import evaluate

    return evaluate.load(str(path(name)))
