"""fedalign's federated loop against one bare TRL SFTTrainer doing the same optimizer steps.

Setting (issue 2, and the measurements of the FedASK and OpenFedLLM loops quoted there): a ~3M-parameter
Llama, 10 clients, 2 per round, 10 local steps, batch 4, 128-token rows: 10 rounds = 200 optimizer steps.
fedalign's figure is the wall time of its round loop (sampling, adapter swaps, local steps, aggregation,
client-state I/O, metrics and per-round checkpoints); TRL's is ``trainer.train()`` for 200 steps on the same
rows. Runs alternate so that machine noise hits both; the ratio of medians is what BENCHMARKS.md records.

    python bench/loop_vs_trl.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tempfile
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from harness import CPU_TRAINER_ARGS, alternate, quiet_cpu, random_llama, round_loop_seconds  # noqa: E402
from rich.console import Console  # noqa: E402
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from fedalign.data.sources import load_examples  # noqa: E402
from fedalign.models.loading import attach_lora, load_tokenizer  # noqa: E402
from fedalign.recipe import validate_recipe  # noqa: E402
from fedalign.runtime.sft import run_sft  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "tiny-llama"


def build_setting(root: Path) -> tuple[Path, Path]:
    """A ~3M-parameter Llama on the embedded tokenizer, and 400 rows of about 128 tokens."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    model = random_llama(256, 512, 4, len(tokenizer), tokenizer)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    sentences = [json.loads(line) for line in (REPO / "data" / "quickstart" / "dolly.jsonl").open()]
    rows = []
    for _ in range(400):
        picks = rng.sample(sentences, 6)
        rows.append(
            {
                "instruction": " ".join(p["instruction"] for p in picks[:3]),
                "context": "",
                "response": " ".join(p["response"] for p in picks[3:]),
                "category": "open_qa",
            }
        )
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def recipe(model_dir: Path, data: Path, out: Path) -> dict:
    return {
        "name": "bench",
        "output_dir": str(out),
        "model": {"name_or_path": str(model_dir)},
        "data": {"source": "dolly", "path": str(data), "holdout": 0},
        "federation": {"num_clients": 10, "clients_per_round": 2, "rounds": 10, "local_steps": 10},
        "lora": {"r": 8, "alpha": 16},
        "train": {"batch_size": 4, "max_length": 128, "learning_rate": 5e-4},
    }


def time_fedalign(raw: dict) -> float:
    return round_loop_seconds(run_sft(validate_recipe(raw), Console(file=io.StringIO())).run_dir)


def time_bare_trl(raw: dict, out: Path) -> float:
    spec = validate_recipe(raw)
    tokenizer = load_tokenizer(spec.model)
    model = attach_lora(LlamaForCausalLM.from_pretrained(spec.model.name_or_path), spec.lora, spec.seed)
    records = [e.to_record() for e in load_examples(spec.data)]
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=200,
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        max_length=128,
        optim=spec.train.optim,
        logging_strategy="no",
        **CPU_TRAINER_ARGS,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer
    )
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
        model_dir, data = build_setting(root)
        raw = recipe(model_dir, data, root / "runs")
        n_params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(model_dir).parameters())
        fed_s, bare_s = alternate(
            lambda: time_fedalign(raw), lambda i: time_bare_trl(raw, root / f"bare{i}"), args.repeats
        )
    print(f"model {n_params / 1e6:.2f}M params; 200 optimizer steps; torch threads {torch.get_num_threads()}")
    print(f"median fedalign loop {fed_s:.2f} s / median bare TRL {bare_s:.2f} s = {fed_s / bare_s:.3f}x")


if __name__ == "__main__":
    main()
