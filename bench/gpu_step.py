"""Tokens/s, model FLOP utilisation and peak memory of one local optimizer step at Llama-2-7B shapes on one
GPU: fedalign's non-private step, fedalign's example-level DP step, and bare TRL.

Setting: a random-weight Llama with Llama-2-7B shapes (hidden 4096, intermediate 11008, 32 layers, 32 heads,
vocab 32000; 6.74B parameters) in bfloat16, SDPA attention, LoRA r=16 (alpha 32) on q_proj/v_proj, batch
8 x 512 random token ids with the whole sequence as completion (labels = input ids, so every position goes
through the LM head), AdamW, clipping at 1.0, no activation checkpointing (estimated ~50 GB at this batch,
DP included; ``--gradient-checkpointing`` turns it on: non-reentrant for the plain steps, reentrant under
DP, as fedalign's VisitLoop does). Three configurations, each with a fresh optimizer:

- fedalign plain: one client visit, ``SFTLocalTrainer.train`` (``VisitLoop``) over (warmup + steps + 1) x 8
  distinct rows, one pass: collate, TRL's ``training_step`` (fused LM head, batch token-mean loss,
  backward), ``clip_grad_norm_``, AdamW, scheduler;
- fedalign DP: the same trainer after ``make_private`` (σ=1, C=1): Poisson draw, collate,
  ``PrivateGradientStep`` (Opacus per-sample hooks on the LoRA tensors, per-sequence losses, per-example
  clipping, Gaussian noise from the client's secret randomness), AdamW, scheduler. The visit's rows are the
  first 8 rows at sample rate q=1, so every Poisson draw is exactly those 8 rows (the compute of a step with
  a realised batch of 8, not a meaningful privacy setting);
- TRL: a fresh model, the same rows as fedalign plain (one epoch, so no epoch boundary inside the timing),
  bare ``SFTTrainer.train()`` for the same number of steps.

A step's time is the interval between the ends of two consecutive steps, CUDA synchronised (fedalign: its
``before_step`` hook, after the gradient is formed; TRL: ``on_step_end``), so each interval holds exactly one
whole step; the first ``--warmup`` intervals are dropped and the median of the next ``--steps`` is reported.
MFU = 6·N·tokens per step / step time / the device's dense bf16 peak (N: the base model's parameter count,
tokens: batch x sequence). The 4·N variant is printed too: with LoRA the frozen weights get no
weight-gradient matmuls, so a step does ~4·N FLOPs per token (forward 2N, input gradients 2N), not 6·N
(with activation checkpointing the recomputed forward adds 2N back as work, not as progress). Peak memory is
``torch.cuda.max_memory_allocated``, reset before each configuration's steps (model weights included).
``--cpu-smoke`` runs the same code at tiny shapes in float32 on the CPU, to check the code without a GPU.

    python bench/gpu_step.py [--steps 10] [--warmup 3] [--peak-tflops 989] [--gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "tiny-llama"  # only its pad/bos/eos ids are used: the rows are token ids already
LORA_R, LORA_ALPHA = 16, 32
CLIP, SIGMA = 1.0, 1.0

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s; the first name contained in get_device_name() wins.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int | None  # None: the tokenizer's
    batch: int
    seq: int
    dtype: torch.dtype


LLAMA2_7B = Shape(4096, 11008, 32, 32, 32000, 8, 512, torch.bfloat16)
SMOKE = Shape(64, 172, 2, 4, None, 2, 32, torch.float32)


@dataclass
class Result:
    name: str
    step_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    wall_s: float = 0.0
    error: str | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)


class StepClock:
    """Timestamps at the end of each step, after the device has finished the work queued so far."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.marks = device, []

    def mark(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        return [b - a for a, b in pairwise(self.marks)][warmup:]


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for key, peak in PEAK_BF16 if key.lower() in name), None)


def load_bench_tokenizer() -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def build_base(shape: Shape, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> LlamaForCausalLM:
    """Random weights, created on ``device`` in the benchmark's dtype (no float32 copy on the host)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab or len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=max(4096, shape.seq),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=shape.dtype)


def bench_rows(shape: Shape, vocab: int, count: int) -> list[dict[str, Any]]:
    """``count`` rows of ``seq`` random token ids (no special tokens), every token a completion token."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for row_id in range(count):
        ids = torch.randint(3, vocab, (shape.seq,), generator=gen).tolist()
        rows.append({"row_id": row_id, "input_ids": ids, "labels": list(ids)})
    return rows


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def read_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def oom_message(error: BaseException) -> str:
    return f"out of memory ({str(error).splitlines()[0][:120]}); try --gradient-checkpointing"


def measure_fedalign(
    shape: Shape, device: torch.device, warmup: int, timed: int, checkpointing: bool
) -> tuple[int, list[Result]]:
    """fedalign plain, then fedalign DP on the same SFTLocalTrainer (make_private, as a DP run does)."""
    from fedalign.client.sft import SFTLocalTrainer
    from fedalign.models.loading import attach_lora
    from fedalign.privacy.randomness import SecretRandomness
    from fedalign.recipe import LoraSection, PrivacySection, TrainSection

    tokenizer = load_bench_tokenizer()
    base = build_base(shape, tokenizer, device)
    n_params = sum(p.numel() for p in base.parameters())
    model = attach_lora(base, LoraSection(r=LORA_R, alpha=LORA_ALPHA), seed=0)
    steps = warmup + timed + 1  # step k's time runs from the end of step k-1 to the end of step k
    train = TrainSection(
        batch_size=shape.batch,
        max_length=shape.seq,
        learning_rate=1e-4,
        max_grad_norm=CLIP,
        gradient_checkpointing=checkpointing,
    )
    local = SFTLocalTrainer(
        model,
        tokenizer,
        train,
        bench_rows(shape, base.config.vocab_size, steps * shape.batch),
        seed=0,
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda" and shape.dtype == torch.bfloat16,
    )
    all_rows = local.rows(list(range(steps * shape.batch)))  # plain: one pass, 8 distinct rows per step
    batch_rows = local.rows(list(range(shape.batch)))  # DP: q=1, every Poisson draw is these 8 rows
    results = []
    for name in ("fedalign plain", "fedalign DP"):
        result = Result(name)
        results.append(result)
        clock = StepClock(device)
        try:
            private = name == "fedalign DP"
            if private:
                local.make_private(
                    PrivacySection(unit="example", noise_multiplier=SIGMA, clip_norm=CLIP), SIGMA
                )
            reset_peak(device)
            started = time.perf_counter()
            visit = local.train(
                batch_rows if private else all_rows,
                steps,
                torch.Generator().manual_seed(0),
                sample_rate=1.0 if private else None,
                before_step=clock.mark,
                randomness=SecretRandomness.fresh() if private else None,
            )
            result.wall_s = time.perf_counter() - started
            result.peak_bytes = read_peak(device)
            if visit.steps != steps or visit.examples != steps * shape.batch or len(visit.losses) != steps:
                raise RuntimeError(f"{name}: the visit did not run {steps} full steps: {visit}")
            result.step_s = clock.step_times(warmup)
        except torch.cuda.OutOfMemoryError as error:
            result.error = oom_message(error)
            model.zero_grad(set_to_none=True)
        release(device)
    del local, model, base, all_rows, batch_rows
    release(device)
    return n_params, results


def measure_trl(shape: Shape, device: torch.device, warmup: int, timed: int, checkpointing: bool) -> Result:
    """Bare TRL: a fresh model with the same LoRA, ``SFTTrainer.train()`` for the same number of steps."""
    from datasets import Dataset
    from harness import CPU_TRAINER_ARGS
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from fedalign.models.loading import attach_lora
    from fedalign.recipe import LoraSection

    class MarkSteps(TrainerCallback):
        def __init__(self, clock: StepClock) -> None:
            self.clock = clock

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.clock.mark()

    result = Result("TRL SFTTrainer")
    clock = StepClock(device)
    if device.type == "cpu":
        device_args = {**CPU_TRAINER_ARGS, "gradient_checkpointing": checkpointing}
    else:
        device_args = {
            "use_cpu": False,
            "bf16": shape.dtype == torch.bfloat16,
            "gradient_checkpointing": checkpointing,
            "report_to": [],
            "save_strategy": "no",
            "disable_tqdm": True,
        }
    tokenizer = load_bench_tokenizer()
    base = build_base(shape, tokenizer, device)
    model = attach_lora(base, LoraSection(r=LORA_R, alpha=LORA_ALPHA), seed=0)
    steps = warmup + timed + 1
    rows = bench_rows(shape, base.config.vocab_size, steps * shape.batch)
    records = [{k: r[k] for k in ("input_ids", "labels")} for r in rows]
    with tempfile.TemporaryDirectory(prefix="gpu-step-trl-") as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=shape.batch,
            max_steps=steps,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            max_grad_norm=CLIP,
            max_length=shape.seq,
            optim="adamw_torch",
            logging_strategy="no",
            seed=0,
            **device_args,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(records),
            processing_class=tokenizer,
            callbacks=[MarkSteps(clock)],
        )
        trainer.remove_callback(PrinterCallback)  # it prints train()'s closing summary dict
        try:
            reset_peak(device)
            started = time.perf_counter()
            trainer.train()
            result.wall_s = time.perf_counter() - started
            result.peak_bytes = read_peak(device)
            result.step_s = clock.step_times(warmup)
        except torch.cuda.OutOfMemoryError as error:
            result.error = oom_message(error)
        del trainer
    del model, base
    release(device)
    return result


def fmt_mfu(flops_per_step: float, result: Result, peak: float | None) -> str:
    if result.error or peak is None:
        return "n/a"
    return f"{100 * flops_per_step / result.median_s / peak:.1f}%"


def versions() -> str:
    import opacus
    import peft
    import transformers
    import trl

    import fedalign

    cuda = f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""
    return (
        f"torch {torch.__version__}{cuda}, transformers {transformers.__version__}, trl {trl.__version__}, "
        f"peft {peft.__version__}, opacus {opacus.__version__}, fedalign {fedalign.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="checkpoint activations (reentrant under DP)"
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes, float32, on the CPU: checks the code only"
    )
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be 1 or more (the first steps carry one-off costs)")
    with warnings.catch_warnings():  # a driver without a device warns here; the line below says it all
        warnings.simplefilter("ignore")
        has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.cpu_smoke:
        parser.exit(2, "gpu_step.py: no CUDA device visible; run it on a GPU, or pass --cpu-smoke\n")

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's checkpointing renames
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    if args.cpu_smoke:
        shape, device = SMOKE, torch.device("cpu")
        torch.set_num_threads(1)
        device_name = f"CPU ({platform.processor() or platform.machine()}), smoke shapes"
    else:
        shape, device = LLAMA2_7B, torch.device("cuda", torch.cuda.current_device())
        device_name = torch.cuda.get_device_name(device)
    peak = peak_flops(device, args.peak_tflops)
    tokens = shape.batch * shape.seq

    n_params, results = measure_fedalign(shape, device, args.warmup, args.steps, args.gradient_checkpointing)
    results.append(measure_trl(shape, device, args.warmup, args.steps, args.gradient_checkpointing))
    flops6, flops4 = 6 * n_params * tokens, 4 * n_params * tokens

    rows = []
    for r in results:
        if r.error:
            print(f"{r.name}: {r.error}", flush=True)
            rows.append(f"| {r.name} | {r.error.split(';')[0]} | n/a | n/a | n/a |")
            continue
        gib = "n/a" if r.peak_bytes is None else f"{r.peak_bytes / 2**30:.1f}"
        memory = "n/a" if r.peak_bytes is None else f"{gib} GiB"
        mfu6, mfu4 = fmt_mfu(flops6, r, peak), fmt_mfu(flops4, r, peak)
        print(
            f"{r.name}: median {r.median_s * 1e3:.1f} ms/step over {len(r.step_s)} timed steps "
            f"(min {min(r.step_s) * 1e3:.1f}, max {max(r.step_s) * 1e3:.1f}), {tokens / r.median_s:,.0f} "
            f"tokens/s, MFU {mfu6} (6N) / {mfu4} (4N), peak {memory}, {r.wall_s:.1f} s for all "
            f"{args.warmup + args.steps + 1} steps",
            flush=True,
        )
        rows.append(f"| {r.name} | {tokens / r.median_s:,.0f} | {mfu6} | {mfu4} | {gib} |")

    peak_text = f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "unknown (pass --peak-tflops)"
    print()
    print(f"device: {device_name}; peak {peak_text}")
    print(f"versions: {versions()}")
    print(
        f"model: Llama, {n_params / 1e6:,.1f}M params (N), hidden {shape.hidden}, {shape.layers} layers, "
        f"{str(shape.dtype).removeprefix('torch.')}; LoRA r={LORA_R} on q_proj/v_proj; batch {shape.batch} x "
        f"{shape.seq} tokens, all completion; activation checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; {args.warmup} warm-up + {args.steps} timed steps"
    )
    print("MFU (4N): LoRA leaves the frozen weights without weight-gradient matmuls, so a step does ~4N")
    print("FLOPs per token (forward 2N + input gradients 2N) rather than the 6N of full fine-tuning.")
    print()
    print("| configuration | tokens/s | MFU (6N) | MFU (4N) | peak GiB |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    print()
    fed, dp, bare = results
    if not fed.error and not dp.error:
        print(f"fedalign DP / fedalign plain: median step time ratio {dp.median_s / fed.median_s:.3f}x")
    if fed.error or bare.error:
        print("fedalign vs TRL: n/a (a configuration did not run)")
    else:
        print(
            f"fedalign vs TRL: median step time ratio {fed.median_s / bare.median_s:.3f}x "
            "(fedalign plain / bare TRL; above 1 means fedalign is slower)"
        )


if __name__ == "__main__":
    main()
