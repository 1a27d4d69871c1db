"""Cost of a pair-level DP-DPO optimizer step against the non-private DPO step, on the same model and batch.

Both sides are fedalign's own text DPO client (``DPOLocalTrainer`` on TRL's ``DPOTrainer``, the reference
being the policy with its adapter disabled), each on its own copy of the same randomly initialised Llama,
driven through its ``VisitLoop`` a few steps per visit. Non-private: TRL's ``training_step`` (policy
forward, no-grad reference forward, sigmoid DPO loss, backward), gradient clipping, AdamW. Private: the
same client after ``make_private`` (unit ``pair``): fedalign's ``PrivateGradientStep`` on the summed
per-pair DPO loss (TRL's own ``compute_loss``, Opacus per-sample hooks on the LoRA parameters only, rows i
and i+B summed per pair, per-pair clipping to C = 1, Gaussian noise σ = 1 once per step) and the same
AdamW. The Poisson rate is 1 on a client of exactly 4 pairs, so every private step, like every plain one,
sees all 4 pairs. A step's time is the interval between two consecutive optimizer steps inside a visit
(batch draw and collation, gradient, optimizer step); visit set-up is in neither. 4 synthetic text pairs
cut from ``data/quickstart/dolly.jsonl`` (prompt + answer about 128 tokens), tokenizer ``data/tiny-llama``,
LoRA r=8 on q_proj/v_proj, float32, 2 threads. Visits of the two kinds alternate so that machine noise hits
both, and the ratio of medians is reported, for a ~3.7M and a ~47.8M parameter Llama.

    python bench/dp_overhead_dpo.py [--steps 20] [--warmup 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"

import torch  # noqa: E402
from harness import quiet_cpu, random_llama  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from fedalign.client.dpo import DPOLocalTrainer  # noqa: E402
from fedalign.data.preferences import PreferenceExample  # noqa: E402
from fedalign.models.loading import attach_lora  # noqa: E402
from fedalign.privacy.randomness import SecretRandomness  # noqa: E402
from fedalign.recipe import DPOSection, LoraSection, PrivacySection, TrainSection  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZES = {"~3.7M": (256, 688, 4, 1024), "~47.8M": (512, 1376, 8, 22000)}  # hidden, intermediate, layers, vocab
PAIRS = 4  # the batch: every step of either kind trains on all 4 pairs (8 rows)
PROMPT_TOKENS, ANSWER_TOKENS = 90, 30  # message text; the chat template adds ~6 to the prompt, 1 to an answer
BLOCK = 5  # timed steps per visit (a visit of BLOCK + 1 optimizer steps has BLOCK intervals)


def make_pairs(tokenizer: Any) -> list[PreferenceExample]:
    """PAIRS text pairs: a prompt cut from dolly's instructions and contexts, chosen and rejected answers cut
    from its responses, each a window of the tokenized text decoded back to a string."""
    rows = [json.loads(line) for line in (REPO / "data" / "quickstart" / "dolly.jsonl").open()]
    prompts = tokenizer(" ".join(f"{r['instruction']} {r['context']}" for r in rows[:400]))["input_ids"]
    answers = tokenizer(" ".join(r["response"] for r in rows[:400]))["input_ids"]

    def window(ids: list[int], index: int, size: int) -> str:
        return tokenizer.decode(ids[index * size : (index + 1) * size]).strip()

    return [
        PreferenceExample(
            row_id=i,
            origin=f"synthetic:{i}",
            prompt=[{"role": "user", "content": window(prompts, i, PROMPT_TOKENS)}],
            chosen=[{"role": "assistant", "content": window(answers, 2 * i, ANSWER_TOKENS)}],
            rejected=[{"role": "assistant", "content": window(answers, 2 * i + 1, ANSWER_TOKENS)}],
        )
        for i in range(PAIRS)
    ]


def build(hidden: int, inter: int, layers: int, vocab: int) -> tuple[DPOLocalTrainer, DPOLocalTrainer, int]:
    """Two DPO clients on copies of one random Llama with the same LoRA; the second one private."""
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "tiny-llama")
    base = random_llama(hidden, inter, layers, vocab, tokenizer)
    params = sum(p.numel() for p in base.parameters())
    pairs = make_pairs(tokenizer)
    train = TrainSection(batch_size=PAIRS, learning_rate=5e-4, max_length=256)  # max_grad_norm 1, AdamW
    clients = []
    for model in (copy.deepcopy(base), base):
        peft = attach_lora(model, LoraSection(r=8, alpha=16), seed=0)
        clients.append(
            DPOLocalTrainer(peft, tokenizer, train, DPOSection(), pairs, vision=False, seed=0, use_cpu=True)
        )
    plain, private = clients
    private.make_private(PrivacySection(unit="pair", noise_multiplier=1.0, clip_norm=1.0), 1.0)
    for client in clients:
        if client.dropped_rows or client.truncated_rows:
            raise RuntimeError("a synthetic pair was dropped or truncated; shorten PROMPT/ANSWER_TOKENS")
    return plain, private, params


class StepClock:
    """``before_step`` hook: the time of each optimizer step of a visit (after its gradient is formed)."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def __call__(self) -> None:
        self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.marks, self.marks[1:], strict=False)]


def visit(client: DPOLocalTrainer, private: bool, steps: int, randomness: SecretRandomness) -> list[float]:
    """One client visit of ``steps`` optimizer steps on all PAIRS pairs; its steps-1 step times."""
    rows = client.rows(list(range(PAIRS)))
    clock = StepClock()
    generator = torch.Generator().manual_seed(0)
    if not private:
        result = client.train(rows, steps, generator, before_step=clock)
    else:  # q = 1: each Poisson draw takes every row, so the batch is all PAIRS pairs, as in the plain step
        result = client.train(
            rows, steps, generator, sample_rate=1.0, before_step=clock, randomness=randomness
        )
    if result.examples != PAIRS * steps or len(clock.marks) != steps:
        raise RuntimeError(f"a visit trained {result.examples} pairs in {len(clock.marks)} steps")
    return clock.intervals()


def measure(name: str, shape: tuple[int, int, int, int], steps: int, warmup: int) -> tuple[str, float, float]:
    plain, private, params = build(*shape)
    lora = sum(p.numel() for p in plain.model.parameters() if p.requires_grad)
    tokenized = plain.trainer.train_dataset
    prompts = tokenized["prompt_ids"]
    lengths = [
        len(p) + len(a)
        for key in ("chosen_ids", "rejected_ids")
        for p, a in zip(prompts, tokenized[key], strict=True)
    ]
    batch = plain.trainer.data_collator([plain.rows(list(range(PAIRS)))[i] for i in range(PAIRS)])
    rows, width = batch["input_ids"].shape
    secret = SecretRandomness.fresh()
    for client, is_private in ((plain, False), (private, True)):  # warm-up: first-touch costs, untimed
        visit(client, is_private, warmup + 1, secret.child("warmup"))
    timings: dict[str, list[float]] = {"plain": [], "private": []}
    block = 0
    while len(timings["plain"]) < steps:
        count = min(BLOCK, steps - len(timings["plain"]))
        timings["plain"] += visit(plain, False, count + 1, secret)
        timings["private"] += visit(private, True, count + 1, secret.child("visit", block))
        block += 1
    plain_s, dp_s = statistics.median(timings["plain"]), statistics.median(timings["private"])
    print(
        f"{name} model ({params / 1e6:.1f}M params, {lora / 1e3:.0f}k LoRA; {PAIRS} pairs, batch {rows} x "
        f"{width} tokens, prompt+answer {min(lengths)}-{max(lengths)}): plain {plain_s * 1e3:.1f} ms, "
        f"DP {dp_s * 1e3:.1f} ms per step, ratio {dp_s / plain_s:.3f}x",
        flush=True,
    )
    return f"Llama {params / 1e6:.1f}M params ({lora / 1e3:.0f}k LoRA)", plain_s, dp_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    parser.add_argument(
        "--warmup", type=int, default=5, help="a warm-up visit of N + 1 untimed steps of each kind, per model"
    )
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be 1 or more and --warmup 0 or more")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's deprecation notes
    quiet_cpu()
    import datasets

    datasets.disable_progress_bars()
    results = [measure(name, shape, args.steps, args.warmup) for name, shape in SIZES.items()]
    print()
    print("| model | plain step | DP step | ratio |")
    print("|---|---|---|---|")
    for label, plain_s, dp_s in results:
        print(f"| {label} | {plain_s * 1e3:.1f} ms | {dp_s * 1e3:.1f} ms | **{dp_s / plain_s:.3f}×** |")
    print()
    ratios = ", ".join(
        f"{name} {dp_s / plain_s:.3f}x" for name, (_, plain_s, dp_s) in zip(SIZES, results, strict=True)
    )
    threads = torch.get_num_threads()
    print(f"ratio of medians (DP / plain), {args.steps} steps each, {threads} threads: {ratios}")


if __name__ == "__main__":
    main()
