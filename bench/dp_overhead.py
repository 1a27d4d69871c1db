"""Cost of a DP-SFT optimizer step against the non-private step, on the same model and batch.

Non-private: TRL's ``SFTTrainer.training_step`` (fused LM head, batch token-mean loss), gradient clipping,
AdamW, exactly as a fedalign client visit runs it. Private: fedalign's ``PrivateGradientStep`` (Opacus
per-sample hooks on the LoRA parameters only, per-sequence losses, per-example clipping, Gaussian noise)
and the same AdamW. Batch 8 x 128 tokens, LoRA r=8 on q_proj/v_proj, float32, 2 threads; steps of the two
kinds alternate so that machine noise hits both, and the ratio of medians is reported, for a ~4M and a
~47M parameter Llama.

    python bench/dp_overhead.py [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from harness import CPU_TRAINER_ARGS, quiet_cpu, random_llama  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from fedalign.models.loading import attach_lora  # noqa: E402
from fedalign.privacy.dpsgd import PrivateGradientStep  # noqa: E402
from fedalign.privacy.randomness import SecretRandomness  # noqa: E402
from fedalign.recipe import LoraSection  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZES = {"~4M": (256, 688, 4, 1024), "~47M": (512, 1376, 8, 22000)}  # hidden, intermediate, layers, vocab


def build(hidden: int, inter: int, layers: int, vocab: int, out: Path) -> tuple[SFTTrainer, dict, int]:
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "tiny-llama")
    base = random_llama(hidden, inter, layers, vocab, tokenizer)
    params = sum(p.numel() for p in base.parameters())
    model = attach_lora(base, LoraSection(r=8, alpha=16), seed=0)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        ids = torch.randint(3, vocab, (128,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 32 + ids[32:]})
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_length=128,
        **CPU_TRAINER_ARGS,
        logging_strategy="no",
    )
    dataset = Dataset.from_list(rows)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    return trainer, dict(batch), params


def _plain_step(trainer: SFTTrainer, batch: dict, lora: list[torch.nn.Parameter]) -> None:
    """One step as a non-private client visit runs it: TRL's training_step, clipping, AdamW."""
    _, num_items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(trainer.model, dict(batch), num_items)
    torch.nn.utils.clip_grad_norm_(lora, 1.0)
    trainer.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)


def measure(name: str, shape: tuple[int, int, int, int], steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trainer, batch, params = build(*shape, Path(tmp))
        model = trainer.model
        lora = [p for p in model.parameters() if p.requires_grad]
        trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
        timings: dict[str, list[float]] = {"plain": [], "private": []}
        noise = SecretRandomness.fresh()
        # Blocks of 5 steps of each kind; hooks are attached (outside the timing) only for private blocks.
        for block in range(steps // 5 + 1):
            for _ in range(5):
                started = time.perf_counter()
                _plain_step(trainer, batch, lora)
                if block:  # the first block of each kind is warm-up
                    timings["plain"].append(time.perf_counter() - started)
            with PrivateGradientStep(
                model, clip_norm=1.0, noise_multiplier=1.0, unit="example", noise=noise
            ) as private:
                for _ in range(5):
                    started = time.perf_counter()
                    private.step(dict(batch), expected_batch_size=8.0)
                    trainer.optimizer.step()
                    model.zero_grad(set_to_none=True)
                    if block:
                        timings["private"].append(time.perf_counter() - started)
        plain, dp = statistics.median(timings["plain"]), statistics.median(timings["private"])
        print(
            f"{name} model ({params / 1e6:.1f}M params, {sum(p.numel() for p in lora) / 1e3:.0f}k LoRA): "
            f"plain {plain * 1e3:.1f} ms, DP {dp * 1e3:.1f} ms per step, ratio {dp / plain:.3f}x",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind (5 or more)")
    args = parser.parse_args()
    if args.steps < 5:
        parser.error("--steps must be 5 or more: steps are timed in blocks of 5 after a warm-up block")
    quiet_cpu()
    import datasets

    datasets.disable_progress_bars()
    for name, shape in SIZES.items():
        measure(name, shape, args.steps)


if __name__ == "__main__":
    main()
