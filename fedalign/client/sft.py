"""Local SFT on TRL's ``SFTTrainer``.

One trainer is built per run. Its construction tokenizes every training row once (TRL's own chat-template
tokenization, completion mask and truncation), and its collator, loss (``compute_loss``: completion tokens
only, EOS included) and ``training_step`` are what each client visit runs through
:class:`~fedalign.client.loop.VisitLoop`. This module and :mod:`fedalign.client.dpo` are the only ones
that construct TRL trainers.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset

from fedalign.algorithms.base import Tensors
from fedalign.client.loop import LocalResult, VisitBatches, VisitLoop, select_view
from fedalign.privacy.randomness import SecretRandomness
from fedalign.recipe import PrivacySection, TrainSection

__all__ = ["LocalResult", "SFTLocalTrainer", "VisitBatches"]

_COLUMNS = ["input_ids", "labels"]


def _count_sft(batch: dict[str, Any]) -> tuple[int, int]:
    return int(batch["input_ids"].shape[0]), int((batch["labels"] != -100).sum())


class SFTLocalTrainer:
    """Federated-visit driver around one TRL ``SFTTrainer``."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        train: TrainSection,
        records: list[dict],
        eval_records: list[dict] | None = None,
        *,
        seed: int,
        use_cpu: bool,
        bf16: bool = False,
    ) -> None:
        from trl import SFTConfig, SFTTrainer

        self.train_cfg = train
        self._scratch = tempfile.TemporaryDirectory(prefix="fedalign-trl-")
        args = SFTConfig(
            output_dir=self._scratch.name,
            per_device_train_batch_size=train.batch_size,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            learning_rate=train.learning_rate,
            lr_scheduler_type=train.lr_scheduler,
            warmup_steps=train.warmup_steps,
            weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm,
            max_length=train.max_length,
            optim=train.optim,
            gradient_checkpointing=train.gradient_checkpointing,
            completion_only_loss=True,
            use_cpu=use_cpu,
            bf16=bf16,
            seed=seed,
            report_to=[],
            logging_strategy="no",
            save_strategy="no",
            disable_tqdm=True,
        )
        logging.getLogger("datasets").setLevel(logging.ERROR)
        self.trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(records),
            eval_dataset=Dataset.from_list(eval_records) if eval_records else None,
            processing_class=tokenizer,
        )
        self.model = self.trainer.model
        self.loop = VisitLoop(self.trainer, train, _count_sft)
        tokenized = self.trainer.train_dataset
        self._position = {row_id: i for i, row_id in enumerate(tokenized["row_id"])}
        self.dropped_rows = sorted({r["row_id"] for r in records} - set(self._position))
        # rows TRL cut at max_length (keep_start: the completion's end, its end-of-sequence token with it):
        # they train the model to go on rather than to stop, which truncation would otherwise hide
        self.truncated_rows = sorted(
            row_id
            for row_id, ids in zip(tokenized["row_id"], tokenized["input_ids"], strict=True)
            if len(ids) >= train.max_length
        )
        self._tokenized = tokenized.select_columns(_COLUMNS)
        evaluation = self.trainer.eval_dataset
        self.eval_rows: Dataset | None = (
            evaluation.select_columns(_COLUMNS) if evaluation is not None else None
        )
        self.dropped_eval_rows = (
            sorted({r["row_id"] for r in eval_records} - set(evaluation["row_id"])) if eval_records else []
        )

    # -- data -------------------------------------------------------------------------------------------
    def rows(self, row_ids: list[int]) -> Dataset:
        """The tokenized rows of one client (a view, no copy)."""
        return select_view(self._tokenized, [self._position[r] for r in row_ids])

    # -- training ---------------------------------------------------------------------------------------
    def make_private(self, privacy: PrivacySection, noise_multiplier: float) -> None:
        self.loop.make_private(privacy, noise_multiplier)

    def train(
        self,
        rows: Dataset,
        steps: int,
        generator: torch.Generator,
        optimizer_state: Tensors | None = None,
        sample_rate: float | None = None,
        before_step: Callable[[], None] | None = None,
        randomness: SecretRandomness | None = None,
    ) -> LocalResult:
        """One client visit: ``steps`` optimizer steps on ``rows`` (see :meth:`VisitLoop.train`)."""
        return self.loop.train(rows, steps, generator, optimizer_state, sample_rate, before_step, randomness)

    @torch.no_grad()
    def evaluate(self, rows: Dataset, batch_size: int) -> float:
        """Mean loss per completion token over ``rows`` (prompt masked, EOS included)."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        device = self.trainer.args.device
        for start in range(0, len(rows), batch_size):
            batch = self.trainer.data_collator(
                [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
            )
            logits = self.model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            labels = batch["labels"].to(device)[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="sum"
            )
            total += float(losses)
            count += int((labels != -100).sum())
        self.model.train(was_training)
        return total / max(count, 1)
