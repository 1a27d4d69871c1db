"""``fedalign sft``: federated supervised fine-tuning on TRL's SFTTrainer (the shared run: :mod:`.run`)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from fedalign import algorithms
from fedalign.client.sft import SFTLocalTrainer
from fedalign.data.examples import Example
from fedalign.data.preferences import PREFERENCE_SOURCES
from fedalign.data.sources import load_examples, split_holdout
from fedalign.errors import RecipeError
from fedalign.models.loading import LoadedModel
from fedalign.privacy.randomness import RunSecrets
from fedalign.recipe import Recipe
from fedalign.runtime.prepare import TaskSetup
from fedalign.runtime.run import RunResult, run_federated
from fedalign.runtime.rundir import RESIDUAL_BASE

__all__ = ["RESIDUAL_BASE", "RunResult", "SFTTask", "run_sft"]


class SFTTask:
    """Prompt/completion rows, TRL's SFTTrainer, held-out loss per completion token."""

    name = "sft"
    privacy_units = ("example", "client")

    def __init__(self) -> None:
        self.train: list[Example] = []
        self.eval: list[Example] = []
        self.skipped: list[dict[str, str]] = []

    def check(self, recipe: Recipe, algorithm: algorithms.Algorithm) -> None:
        if recipe.data.source in PREFERENCE_SOURCES:
            raise RecipeError(
                f"data.source: {recipe.data.source!r}: this is a DPO recipe (preference pairs); run it with "
                "fedalign dpo"
            )
        if recipe.eval.preferred_pattern is not None:
            raise RecipeError("eval.preferred_pattern: measured by fedalign dpo only")

    def load_data(self, recipe: Recipe, vision: bool) -> None:
        if vision:
            raise RecipeError(
                "model.name_or_path: fedalign sft trains text models; vision-language SFT is not "
                "supported yet"
            )
        data = recipe.data
        examples = load_examples(data, skipped=self.skipped)
        if data.eval_path:
            self.train = examples
            self.eval = load_examples(data, path=data.eval_path, split=data.eval_split, skipped=self.skipped)
        else:
            self.train, self.eval = split_holdout(examples, data.holdout, recipe.seed)

    def build(self, recipe: Recipe, loaded: LoadedModel, console: Console) -> TaskSetup:
        with console.status("tokenizing (once per run)"):
            trainer = SFTLocalTrainer(
                loaded.model,
                loaded.tokenizer,
                recipe.train,
                [e.to_record() for e in self.train],
                [e.to_record() for e in self.eval],
                seed=recipe.seed,
                use_cpu=loaded.device.type == "cpu",
                bf16=loaded.device.type == "cuda" and recipe.model.dtype == "bfloat16",
            )
        kept = warn_dropped(console, recipe, self.train, trainer.dropped_rows)
        warn_truncated(console, recipe, self.train, getattr(trainer, "truncated_rows", []))
        warn_skipped(console, self.skipped)
        dropped_eval = set(trainer.dropped_eval_rows)

        def evaluate(round_idx: int, run_dir: Path) -> dict[str, float]:
            if trainer.eval_rows is None or len(trainer.eval_rows) == 0:
                return {}
            return {"eval_loss": trainer.evaluate(trainer.eval_rows, recipe.eval.batch_size)}

        return TaskSetup(
            trainer=trainer,
            processing_class=loaded.tokenizer,
            kept=kept,
            eval_ids=[e.row_id for e in self.eval if e.row_id not in dropped_eval],
            evaluate=evaluate,
            manifest={"skipped_rows": self.skipped},
        )


def warn_dropped(console: Console, recipe: Recipe, rows: list, dropped_ids: list[int]) -> list:
    """The rows TRL kept after truncation; says how many were dropped (they are listed in partition.json)."""
    dropped = set(dropped_ids)
    if dropped and len(dropped) < len(rows):  # all dropped: the run stops with an error that says so
        first = next(e.origin for e in rows if e.row_id in dropped)
        console.print(
            f"[yellow]warning:[/yellow] {len(dropped)} training rows have no completion token left within "
            f"train.max_length={recipe.train.max_length} and are not used (first: {first}); "
            "the run lists them in partition.json"
        )
    return [e for e in rows if e.row_id not in dropped]


def warn_truncated(console: Console, recipe: Recipe, rows: list, truncated_ids: list[int]) -> None:
    """Says how many kept rows lost their end of sequence to ``train.max_length`` (in partition.json)."""
    truncated = set(truncated_ids)
    if truncated:
        first = next(e.origin for e in rows if e.row_id in truncated)
        every = " (every one: raise train.max_length)" if len(truncated) == len(rows) else ""
        console.print(
            f"[yellow]warning:[/yellow] {len(truncated)} training rows lose their end-of-sequence token to "
            f"train.max_length={recipe.train.max_length}{every} and train the model to go on rather than "
            f"stop (first: {first})"
        )


def warn_skipped(console: Console, skipped: list[dict[str, str]]) -> None:
    if skipped:
        first = skipped[0]
        console.print(
            f"[yellow]warning:[/yellow] data.on_bad_row=skip left out {len(skipped)} bad rows (first: "
            f"{first['origin']}: {first['reason']}); all are listed in partition.json under skipped_rows"
        )


def run_sft(recipe: Recipe, console: Console | None = None, secrets: RunSecrets | None = None) -> RunResult:
    """``secrets``: an earlier DP run's keys (``RunSecrets.load(run_dir / "private")``) to replay it."""
    return run_federated(recipe, SFTTask(), console, secrets)
