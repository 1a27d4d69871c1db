"""One folder per benchmark: its prompts, parsers and metrics, with no generation and no judge calls.
Generation, judging and the ``fedalign eval`` command live in :mod:`fedalign.evaluation`.

- ``gsm8k``, ``gsmhard``: Hugging Face ``evaluate`` modules (``evaluate.load("evaluators/gsm8k")``, or
  :func:`load`), declared in ``bench.yaml``.
- ``mmsafetybench``, ``siuo``, ``beavertailsv``, ``spavl``: a judge stands between a response and its score,
  so these are plain modules: ``templates.py`` (upstream's prompts verbatim, with their hashes) and
  ``scoring.py`` (verdict parsers and metrics, ``faithful`` and ``corrected``).
- ``refusal``: the refusal-keyword proxy the safety benchmarks fall back on (``--judge keyword``).

Each folder's README.md is its card: data layout, protocol, metrics, upstream quirks."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def available() -> list[str]:
    """The benchmarks: every folder holding an ``evaluate`` module of its own name or a ``scoring.py``."""
    return sorted(
        p.name for p in ROOT.iterdir() if (p / f"{p.name}.py").is_file() or (p / "scoring.py").is_file()
    )


def path(name: str) -> Path:
    if name not in available():
        raise KeyError(f"unknown benchmark {name!r} (available: {', '.join(available())})")
    return ROOT / name


def load(name: str):
    """The benchmark's ``evaluate`` module (GSM8K, GSM-hard), loaded from this folder by path (never from
    a hub)."""
    import evaluate

    return evaluate.load(str(path(name)))
