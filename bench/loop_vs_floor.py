"""fedalign's federated round loop against the floor: a hand-written PyTorch loop doing the same steps.

The setting of ``bench/loop_vs_trl.py`` (a ~3M-parameter Llama, 10 clients, 2 per round, 10 rounds of 10
local steps, batch 4, 128-token rows, LoRA r=8 on q/v). The floor replays exactly the visits of the
fedalign run it is compared with (the same cohorts from its ``metrics.jsonl``, each client's rows from its
``partition.json``, the same batch order from the same visit seeds, TRL's own collator) on the same PEFT
model: per visit a fresh AdamW (what the visit's optimizer is), then per step forward with labels, backward,
gradient clipping, step. Nothing else: no adapter swaps, client state, aggregation, metrics or checkpoints.
That is the least any federated runtime must do for these steps. A second floor does the same with TRL's
``training_step`` in place of the model's own loss and ``backward``, which splits the remainder into what
TRL's step costs (its fused LM head, entropy and token accuracy) and what the runtime around it costs.

fedalign's figure is its round loop's wall time (``rounds_wall_s``); the two alternate, medians of repeats.
Then one more fedalign run under cProfile breaks the remainder down per round: local steps (TRL's
``training_step``, clipping, optimizer), optimizer set-up per visit, adapter swaps, client-state I/O,
aggregation, metrics and checkpoints (cProfile inflates Python-heavy parts; read it as shares).

    python bench/loop_vs_floor.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"

import torch  # noqa: E402
from harness import quiet_cpu, round_loop_seconds  # noqa: E402
from loop_vs_trl import build_setting, recipe  # noqa: E402
from rich.console import Console  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from fedalign.client.loop import VisitBatches  # noqa: E402
from fedalign.client.sft import SFTLocalTrainer  # noqa: E402
from fedalign.data.sources import load_examples  # noqa: E402
from fedalign.models.loading import attach_lora, load_tokenizer  # noqa: E402
from fedalign.recipe import validate_recipe  # noqa: E402
from fedalign.runtime.clients import visit_seed  # noqa: E402
from fedalign.runtime.sft import run_sft  # noqa: E402

_FORWARD_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")
# component -> (module path fragment, function names) whose cumulative time it is, in the profiled run
COMPONENTS = {
    "local steps (TRL training_step, clip, AdamW)": ("client/loop.py", ("_plain_steps",)),
    "optimizer set-up per visit": ("trainer.py", ("create_optimizer_and_scheduler",)),
    "adapter swaps (write, read, trainable)": ("models/adapter.py", ("write", "read", "set_trainable")),
    "client-state I/O": ("runtime/state.py", ("load", "save", "snapshot")),
    "aggregation": ("runtime/federation.py", ("_aggregate",)),
    "metrics": ("runtime/federation.py", ("_log",)),
    "checkpoints": ("runtime/state.py", ("save_checkpoint",)),
}


def run_fedalign(raw: dict) -> tuple[float, Path]:
    run_dir = run_sft(validate_recipe(raw), Console(file=io.StringIO())).run_dir
    return round_loop_seconds(run_dir), run_dir


class Floor:
    """The hand-written loop, set up once (model, tokenized rows, collator) and replayed per repeat."""

    def __init__(self, raw: dict, run_dir: Path) -> None:
        spec = validate_recipe(raw)
        self.spec = spec
        model = attach_lora(LlamaForCausalLM.from_pretrained(spec.model.name_or_path), spec.lora, spec.seed)
        records = [e.to_record() for e in load_examples(spec.data)]
        # fedalign's SFT client is used only for what it prepares: TRL's tokenized rows and collator
        self.local = SFTLocalTrainer(
            model, load_tokenizer(spec.model), spec.train, records, seed=spec.seed, use_cpu=True
        )
        self.model = self.local.model
        partition = json.loads((run_dir / "partition.json").read_text())
        self.rows = {c["client"]: c["row_ids"] for c in partition["clients"]}
        rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        self.cohorts = [r["clients"] for r in rounds if r["type"] == "round"]

    def run(self, trl_step: bool = False) -> float:
        """The replay's wall time; with ``trl_step`` each step's forward and backward is TRL's
        ``training_step`` (as in a fedalign visit) instead of the model's own loss and ``backward``."""
        spec, trainer = self.spec, self.local.trainer
        collate = trainer.data_collator
        trainer.current_gradient_accumulation_steps = 1  # what a fedalign visit sets before its steps
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        started = time.perf_counter()
        for round_idx, cohort in enumerate(self.cohorts):
            for client in cohort:
                rows = self.local.rows(self.rows[client])
                order = torch.Generator().manual_seed(visit_seed(spec.seed, client, round_idx))
                batches = VisitBatches(len(rows), spec.train.batch_size, spec.federation.local_steps, order)
                optimizer = torch.optim.AdamW(params, lr=spec.train.learning_rate, weight_decay=0.0)
                for batch in DataLoader(rows, batch_sampler=batches, collate_fn=collate):
                    if trl_step:
                        trainer.training_step(self.model, batch, None)
                    else:
                        loss = self.model(**{k: v for k, v in batch.items() if k in _FORWARD_KEYS}).loss
                        loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, spec.train.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started


def breakdown(raw: dict) -> tuple[float, dict[str, float]]:
    """One profiled fedalign run: the round loop's wall time and each component's cumulative seconds."""
    profiler = cProfile.Profile()
    profiler.enable()
    loop_s, _ = run_fedalign(raw)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    seconds = dict.fromkeys(COMPONENTS, 0.0)
    for (filename, _, function), (_, _, _, cumulative, _) in stats.items():
        for component, (where, names) in COMPONENTS.items():
            if filename.endswith(where) and function in names:
                seconds[component] += cumulative
    return loop_s, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quiet_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = build_setting(root)
        raw = recipe(model_dir, data, root / "runs")
        _, first_run = run_fedalign(raw)  # warm-up, and the visits the floor replays
        floor = Floor(raw, first_run)
        floor.run()  # warm-up
        fed_s, floor_s, trl_s = [], [], []
        for i in range(args.repeats):
            fed_s.append(run_fedalign(raw)[0])
            floor_s.append(floor.run())
            trl_s.append(floor.run(trl_step=True))
            print(f"repeat {i + 1}: fedalign {fed_s[-1]:.2f} s, floor {floor_s[-1]:.2f} s, floor with TRL's "
                  f"step {trl_s[-1]:.2f} s, ratio {fed_s[-1] / floor_s[-1]:.3f}", flush=True)  # fmt: skip
        profiled_s, seconds = breakdown(raw)
    rounds = len(floor.cohorts)
    fed, bare, trl = statistics.median(fed_s), statistics.median(floor_s), statistics.median(trl_s)
    print(f"\nper round ({rounds} rounds; profiled run {profiled_s:.2f} s, cProfile included):")
    print("| component | ms per round (profiled) |")
    print("|---|---|")
    for component, s in seconds.items():
        print(f"| {component} | {s / rounds * 1000:.1f} |")
    print(f"| remainder: fedalign − floor, unprofiled medians | {(fed - bare) / rounds * 1000:.1f} |")
    print(f"| of which TRL's training_step − the model's own loss | {(trl - bare) / rounds * 1000:.1f} |")
    print(f"\nfedalign / floor with TRL's step: {fed / trl:.3f}x (the runtime's own overhead)")
    print(f"median fedalign loop {fed:.2f} s / median floor {bare:.2f} s = {fed / bare:.3f}x")


if __name__ == "__main__":
    main()
