"""fedalign's federated DPO loop against one bare TRL DPOTrainer doing the same optimizer steps.

Setting: the embedded tiny LLaVA (``data/tiny-llava``) on the bundled SPA-VL-schema pairs
(``data/quickstart-dpo/spavl.parquet``, images decoded per batch), LoRA r=8 on the language model's q/v and
the projector, 10 clients, 2 per round, 10 local steps, batch 4: 10 rounds = 200 optimizer steps.
fedalign's figure is the wall time of its round loop (sampling, adapter swaps, local steps, aggregation,
client-state I/O, metrics and per-round checkpoints); TRL's is ``trainer.train()`` for 200 steps on the
same rows (TRL decodes the images up front; fedalign per batch). Runs alternate so that machine noise
hits both; the ratio of medians is what BENCHMARKS.md records.

    python bench/dpo_loop_vs_trl.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from harness import CPU_TRAINER_ARGS, alternate, quiet_cpu, round_loop_seconds  # noqa: E402
from rich.console import Console  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from fedalign.data.preferences import load_preferences  # noqa: E402
from fedalign.models.loading import load_model  # noqa: E402
from fedalign.recipe import validate_recipe  # noqa: E402
from fedalign.runtime.dpo import run_dpo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def recipe(out: Path) -> dict:
    return {
        "name": "bench-dpo",
        "output_dir": str(out),
        "device": "cpu",
        "model": {"name_or_path": str(REPO / "data" / "tiny-llava")},
        "data": {
            "source": "spavl",
            "path": str(REPO / "data" / "quickstart-dpo" / "spavl.parquet"),
            "holdout": 0,
        },
        "federation": {"num_clients": 10, "clients_per_round": 2, "rounds": 10, "local_steps": 10},
        "lora": {"r": 8, "alpha": 16},
        "train": {"batch_size": 4, "learning_rate": 5e-4},
    }


def time_fedalign(raw: dict) -> float:
    return round_loop_seconds(run_dpo(validate_recipe(raw), Console(file=io.StringIO())).run_dir)


def time_bare_trl(raw: dict, out: Path) -> float:
    spec = validate_recipe(raw)
    loaded = load_model(spec.model, spec.lora, spec.seed, torch.device("cpu"))
    pairs = load_preferences(spec.data, vision=True).examples
    records = []
    for example in pairs:
        record = example.to_record(with_image=True)
        record.pop("row_id")
        records.append(record)
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=200,
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        max_length=None,
        beta=0.1,
        remove_unused_columns=False,
        logging_strategy="no",
        **CPU_TRAINER_ARGS,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=loaded.model,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=loaded.tokenizer,
    )
    if "ref" in trainer.model.peft_config:  # as fedalign does: the reference is the adapter-disabled model
        trainer.model.delete_adapter("ref")
        trainer.model.set_adapter("default")
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quiet_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw = recipe(root / "runs")
        fed_s, bare_s = alternate(
            lambda: time_fedalign(raw), lambda i: time_bare_trl(raw, root / f"bare{i}"), args.repeats
        )
    print(f"tiny LLaVA DPO; 200 optimizer steps of 4 pairs; torch threads {torch.get_num_threads()}")
    print(f"median fedalign loop {fed_s:.2f} s / median bare TRL {bare_s:.2f} s = {fed_s / bare_s:.3f}x")


if __name__ == "__main__":
    main()
