"""``fedalign dpo``: federated DPO on TRL's DPOTrainer for text LMs and LLaVA-1.5 (shared run: :mod:`.run`).

Held-out evaluation reports TRL's DPO loss, the reward accuracy (the share of held-out pairs whose
implicit reward β·log(π/π_ref) is higher for the chosen answer; 0 before training, where π = π_ref) and
margin, and, when ``eval.preferred_pattern`` is set, the share of greedy answers to held-out prompts that
show the preferred behaviour. Those answers are kept in ``generations.jsonl`` so the rate can be checked
by reading them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console

from fedalign import algorithms
from fedalign.client.dpo import DPOLocalTrainer
from fedalign.data.preferences import PreferenceExample, load_preferences
from fedalign.data.sources import holdout_size
from fedalign.errors import DataError, RecipeError
from fedalign.models.loading import LoadedModel
from fedalign.privacy.pairs import ensure_pair_decomposable
from fedalign.privacy.randomness import RunSecrets
from fedalign.recipe import Recipe
from fedalign.runtime.prepare import TaskSetup
from fedalign.runtime.run import RunResult, run_federated
from fedalign.runtime.sft import warn_dropped, warn_skipped, warn_truncated

GENERATIONS = "generations.jsonl"


def split_pairs(
    examples: list[PreferenceExample], holdout: float, seed: int
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(train, held out), each in row order, drawn with the run seed's own generator."""
    size = holdout_size(len(examples), holdout)
    if size >= len(examples):
        raise DataError(
            f"data.holdout: holding out {size} of {len(examples)} pairs would leave none to train on"
        )
    held = {int(i) for i in np.random.default_rng(seed).permutation(len(examples))[:size]}
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )


class DPOTask:
    """Preference pairs (with images for a vision-language model), TRL's DPOTrainer, DPO metrics."""

    name = "dpo"
    privacy_units = ("pair", "client")

    def __init__(self) -> None:
        self.train: list[PreferenceExample] = []
        self.eval: list[PreferenceExample] = []
        self.skipped: list[dict[str, str]] = []

    def check(self, recipe: Recipe, algorithm: algorithms.Algorithm) -> None:
        if recipe.privacy.unit == "pair":
            try:
                ensure_pair_decomposable(recipe.dpo.loss_type)
            except RecipeError as error:
                raise RecipeError(f"dpo.loss_type: {error}") from None
        if algorithm.moves_base:
            raise RecipeError(
                f"algorithm.name: {algorithm.name} moves the base weights every round, so the "
                "adapter-disabled model would no longer be DPO's reference; use it with fedalign sft"
            )

    def load_data(self, recipe: Recipe, vision: bool) -> None:
        data = recipe.data
        loaded = load_preferences(data, vision=vision)
        self.skipped = loaded.skipped
        if data.eval_path:
            self.train = loaded.examples
            held = load_preferences(data, vision=vision, path=data.eval_path, split=data.eval_split)
            self.eval, self.skipped = held.examples, self.skipped + held.skipped
        else:
            self.train, self.eval = split_pairs(loaded.examples, data.holdout, recipe.seed)

    def build(self, recipe: Recipe, loaded: LoadedModel, console: Console) -> TaskSetup:
        with console.status("preparing the DPO trainer (text pairs are tokenized once per run)"):
            trainer = DPOLocalTrainer(
                loaded.model,
                loaded.tokenizer,
                recipe.train,
                recipe.dpo,
                self.train,
                self.eval,
                vision=loaded.vision,
                seed=recipe.seed,
                use_cpu=loaded.device.type == "cpu",
                bf16=loaded.device.type == "cuda" and recipe.model.dtype == "bfloat16",
            )
        kept = warn_dropped(console, recipe, self.train, trainer.dropped_rows)
        warn_truncated(console, recipe, self.train, trainer.truncated_rows)
        warn_skipped(console, self.skipped)
        cfg = recipe.eval
        prompts = trainer.eval_examples[: cfg.generations]

        def evaluate(round_idx: int, run_dir: Path) -> dict[str, float]:
            if trainer.eval_rows is None or len(trainer.eval_rows) == 0:
                return {}
            measured = trainer.evaluate(trainer.eval_rows, cfg.batch_size)
            measured = {"eval_loss": measured.pop("loss"), **measured}
            if cfg.preferred_pattern is not None and prompts:
                rate, answers = trainer.preferred_rate(
                    prompts, cfg.preferred_pattern, cfg.max_new_tokens, cfg.batch_size
                )
                measured["preferred_rate"] = rate
                with open(run_dir / GENERATIONS, "a", encoding="utf-8") as out:
                    for example, answer in zip(prompts, answers, strict=True):
                        out.write(
                            json.dumps({"round": round_idx, "row_id": example.row_id, "answer": answer})
                            + "\n"
                        )
            return measured

        return TaskSetup(
            trainer=trainer,
            processing_class=loaded.tokenizer,
            kept=kept,
            eval_ids=[e.row_id for e in trainer.eval_examples],
            evaluate=evaluate,
            manifest={"skipped_rows": self.skipped},
        )


def run_dpo(recipe: Recipe, console: Console | None = None, secrets: RunSecrets | None = None) -> RunResult:
    """``secrets``: an earlier DP run's keys (``RunSecrets.load(run_dir / "private")``) to replay it."""
    return run_federated(recipe, DPOTask(), console, secrets)
