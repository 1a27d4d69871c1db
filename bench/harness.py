"""What the benchmarks share: quiet CPU settings for a bare TRL trainer, and the alternating
fedalign-vs-TRL comparison whose ratio of medians BENCHMARKS.md records."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

CPU_TRAINER_ARGS: dict[str, Any] = {
    "use_cpu": True,
    "bf16": False,  # TRL's configs default to bf16 autocast; fedalign's CPU runs are float32
    "gradient_checkpointing": False,
    "report_to": [],
    "save_strategy": "no",
    "disable_tqdm": True,
}
"""TrainingArguments every bare-TRL side uses: float32 on the CPU, nothing saved or reported."""


def round_loop_seconds(run_dir: Path) -> float:
    """fedalign's figure: the wall time of the round loop, from the run's summary record."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return next(json.loads(x) for x in lines if '"summary"' in x)["rounds_wall_s"]


def alternate(
    fedalign: Callable[[], float], bare: Callable[[int], float], repeats: int
) -> tuple[float, float]:
    """Time both sides in turn ``repeats`` times after one fedalign warm-up (first-touch costs go to neither
    side), so that machine noise hits both; prints each repeat and returns the two medians."""
    fedalign()
    fed_s, bare_s = [], []
    for i in range(repeats):
        fed_s.append(fedalign())
        bare_s.append(bare(i))
        ratio = fed_s[-1] / bare_s[-1]
        print(f"repeat {i + 1}: fedalign {fed_s[-1]:.2f} s, bare TRL {bare_s[-1]:.2f} s, ratio {ratio:.3f}")
    return statistics.median(fed_s), statistics.median(bare_s)
