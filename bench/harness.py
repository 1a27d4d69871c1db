"""What the benchmarks share: quiet CPU settings for a bare TRL trainer and for the process, the random
Llama the step benchmarks time, and the alternating fedalign-vs-TRL comparison whose ratio of medians
BENCHMARKS.md records."""

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


def quiet_cpu(threads: int = 2) -> None:
    """The benchmarks' process settings: ``threads`` torch threads, no transformers warnings or bars."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def random_llama(hidden: int, inter: int, layers: int, vocab: int, tokenizer: Any) -> Any:
    """A Llama of the given shape with random weights (seed 0), heads of 64, on ``tokenizer``'s ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


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
