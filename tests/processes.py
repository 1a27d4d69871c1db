"""The fedalign command in a child process that starts in a fraction of a second.

A fresh ``python -m`` pays about ten seconds of imports (torch, transformers, TRL) per run; the kill and
signal tests need many real processes. A forkserver imports fedalign once, then forks each child from
that clean state (no torch thread pool started yet, so forking is safe). Each child is a real process:
it gets real signals, dies by a real SIGKILL, and its stdout/stderr go to a file.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

_PRELOAD = ["fedalign.cli", "fedalign.runtime.sft", "fedalign.runtime.dpo", "fedalign.runtime.resume"]
_context = None


def _cli(argv: list[str], env: dict[str, str], output: str) -> None:
    os.environ.update(env)
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["fedalign", *argv]
    from fedalign.cli import main

    main()


def start_cli(argv: list[str], output: Path, **env: str) -> multiprocessing.Process:
    """``fedalign ARGV...`` in a forked child (``env`` added to its environment); output to ``output``."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    process = _context.Process(target=_cli, args=(argv, {"COLUMNS": "300", **env}, str(output)))
    process.start()
    return process


def run_cli(argv: list[str], output: Path, timeout: float = 600, **env: str) -> int:
    """Run ``fedalign ARGV...`` in a child to its end; returns its exit code (``-9``: killed)."""
    process = start_cli(argv, output, **env)
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise TimeoutError(f"fedalign {' '.join(argv)} ran past {timeout} s")
    return process.exitcode
