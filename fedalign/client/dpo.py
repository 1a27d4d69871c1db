"""Local DPO on TRL's ``DPOTrainer``, for text LMs and LLaVA-style vision-language models.

One trainer per run, as for SFT. Text pairs are tokenized once by TRL at construction (its chat template,
prompt/completion split and truncation). Vision pairs are not: TRL's ``DataCollatorForVisionPreference``
tokenizes and processes images per batch, and here a client's rows are a :class:`LazyPairs` view whose
images are decoded only when their batch is collated. Each visit runs through
:class:`~fedalign.client.loop.VisitLoop`: TRL's own ``compute_loss`` (policy and reference forward),
plain or under pair-level DP-SGD (:func:`fedalign.privacy.pairs.dpo_pair_loss`).

The reference is the policy model with its adapters disabled: the base, or the base with the recipe's
starting adapter merged in (``model.adapter``). Given a PEFT model, TRL 1.16 instead snapshots the
adapter it is handed into a frozen ``ref`` adapter; that would be harmless at B=0 but silently wrong for
any algorithm whose initial adapter is not zero, and it costs a second adapter per module, so it is
removed and the reference is pinned to the adapter-disabled model.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
from datasets import Dataset

from fedalign.algorithms.base import Tensors
from fedalign.client.loop import LocalResult, VisitLoop, select_view
from fedalign.data.preferences import PreferenceExample
from fedalign.privacy.pairs import dpo_pair_loss, ensure_pair_decomposable
from fedalign.privacy.randomness import SecretRandomness
from fedalign.recipe import DPOSection, PrivacySection, TrainSection

_TEXT_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]


def _count_pairs(batch: dict[str, Any]) -> tuple[int, int]:
    return int(batch["input_ids"].shape[0]) // 2, int(batch["completion_mask"].sum())


class LazyPairs(Sequence):
    """A client's vision preference rows; ``pairs[i]`` decodes row i's image then (for its batch)."""

    def __init__(self, examples: list[PreferenceExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        record = self.examples[index].to_record(with_image=True)
        record.pop("row_id")
        return record


class DPOLocalTrainer:
    """Federated-visit driver around one TRL ``DPOTrainer`` (the reference: adapters disabled)."""

    def __init__(
        self,
        model: torch.nn.Module,
        processing_class: Any,
        train: TrainSection,
        dpo: DPOSection,
        examples: list[PreferenceExample],
        eval_examples: list[PreferenceExample] | None = None,
        *,
        vision: bool,
        seed: int,
        use_cpu: bool,
        bf16: bool = False,
    ) -> None:
        from trl import DPOConfig, DPOTrainer

        self.train_cfg, self.vision = train, vision
        self._scratch = tempfile.TemporaryDirectory(prefix="fedalign-trl-")
        args = DPOConfig(
            output_dir=self._scratch.name,
            per_device_train_batch_size=train.batch_size,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            learning_rate=train.learning_rate,
            lr_scheduler_type=train.lr_scheduler,
            warmup_steps=train.warmup_steps,
            weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm,
            max_length=None if vision else train.max_length,  # truncation could cut image tokens (§4)
            optim=train.optim,
            gradient_checkpointing=train.gradient_checkpointing,
            beta=dpo.beta,
            loss_type=dpo.loss_type if isinstance(dpo.loss_type, list) else [dpo.loss_type],
            label_smoothing=dpo.label_smoothing,
            remove_unused_columns=False,
            precompute_ref_log_probs=False,
            use_cpu=use_cpu,
            bf16=bf16,
            seed=seed,
            report_to=[],
            logging_strategy="no",
            save_strategy="no",
            disable_tqdm=True,
        )
        logging.getLogger("datasets").setLevel(logging.ERROR)
        if vision:  # TRL only looks at the first row to detect vision data; batches are collated lazily
            train_dataset = Dataset.from_list([LazyPairs(examples[:1])[0]])
            eval_dataset = None
        else:
            train_dataset = Dataset.from_list([e.to_record() for e in examples])
            eval_dataset = (
                Dataset.from_list([e.to_record() for e in eval_examples]) if eval_examples else None
            )
        self.trainer = DPOTrainer(
            model=model,
            ref_model=None,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
        )
        self.model = self.trainer.model
        if "ref" in self.model.peft_config:  # see the module docstring: the reference is adapters-disabled
            self.model.delete_adapter("ref")
            self.model.set_adapter("default")
        self.processing_class = processing_class
        self.loop = VisitLoop(
            self.trainer, train, _count_pairs, unit="pair", private_loss=lambda: dpo_pair_loss(self.trainer)
        )
        self._examples = {e.row_id: e for e in examples}
        self.eval_examples = list(eval_examples or [])
        self.truncated_rows: list[
            int
        ] = []  # pairs whose chosen or rejected answer loses its end to max_length
        if vision:
            self.dropped_rows: list[int] = []
            self.eval_rows: Any = LazyPairs(self.eval_examples) if self.eval_examples else None
            self.dropped_eval_rows: list[int] = []
            return
        tokenized = self.trainer.train_dataset
        self._position = {row_id: i for i, row_id in enumerate(tokenized["row_id"])}
        self.dropped_rows = sorted(set(self._examples) - set(self._position))
        limit = train.max_length
        self.truncated_rows = sorted(
            row_id
            for row_id, prompt, chosen, rejected in zip(
                tokenized["row_id"],
                tokenized["prompt_ids"],
                tokenized["chosen_ids"],
                tokenized["rejected_ids"],
                strict=True,
            )
            if len(prompt) + max(len(chosen), len(rejected)) > limit
        )  # the collator cuts each sequence at max_length (TRL's keep_start), the answer's end first
        self._tokenized = tokenized.select_columns(_TEXT_COLUMNS)
        evaluation = self.trainer.eval_dataset
        self.eval_rows = evaluation.select_columns(_TEXT_COLUMNS) if evaluation is not None else None
        kept_eval = set(evaluation["row_id"]) if evaluation is not None else set()
        self.dropped_eval_rows = sorted({e.row_id for e in self.eval_examples} - kept_eval)
        self.eval_examples = [e for e in self.eval_examples if e.row_id in kept_eval]

    # -- data -------------------------------------------------------------------------------------------
    def rows(self, row_ids: list[int]) -> Any:
        """One client's rows: tokenized text pairs (a view), or lazily decoded vision pairs."""
        if self.vision:
            return LazyPairs([self._examples[r] for r in row_ids])
        return select_view(self._tokenized, [self._position[r] for r in row_ids])

    # -- training ---------------------------------------------------------------------------------------
    def make_private(self, privacy: PrivacySection, noise_multiplier: float) -> None:
        """Pair-level DP-SGD; refuses a loss type that couples the pairs of a batch before any step."""
        ensure_pair_decomposable(self.trainer.loss_types)
        self.loop.make_private(privacy, noise_multiplier)

    def train(
        self,
        rows: Any,
        steps: int,
        generator: torch.Generator,
        optimizer_state: Tensors | None = None,
        sample_rate: float | None = None,
        before_step: Callable[[], None] | None = None,
        randomness: SecretRandomness | None = None,
    ) -> LocalResult:
        """One client visit: ``steps`` optimizer steps on ``rows`` (see :meth:`VisitLoop.train`)."""
        return self.loop.train(rows, steps, generator, optimizer_state, sample_rate, before_step, randomness)

    # -- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, rows: Any, batch_size: int) -> dict[str, float]:
        """Held-out DPO loss, reward accuracy (β·log-ratio of chosen > rejected, strictly) and mean margin,
        from TRL's own loss on every pair (policy vs the adapter-disabled reference)."""
        trainer = self.trainer
        was_training = self.model.training
        self.model.eval()
        metrics = trainer._metrics["eval"]
        totals = {"loss": 0.0, "reward_accuracy": 0.0, "reward_margin": 0.0}
        count = 0
        device = trainer.args.device
        for start in range(0, len(rows), batch_size):
            batch = trainer.data_collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            pairs = int(inputs["input_ids"].shape[0]) // 2
            loss = float(trainer.compute_loss(self.model, inputs))
            totals["loss"] += loss * pairs
            totals["reward_accuracy"] += metrics["rewards/accuracies"][-1] * pairs
            totals["reward_margin"] += metrics["rewards/margins"][-1] * pairs
            count += pairs
            for values in metrics.values():
                values.clear()
        self.model.train(was_training)
        return {k: v / max(count, 1) for k, v in totals.items()}

    @torch.no_grad()
    def generate(self, examples: list[PreferenceExample], max_new_tokens: int, batch_size: int) -> list[str]:
        """Greedy answers to the examples' prompts (with their images), decoded without special tokens."""
        from trl.data_utils import prepare_multimodal_messages

        was_training = self.model.training
        self.model.eval()
        processor = self.processing_class
        tokenizer = getattr(processor, "tokenizer", processor)
        answers: list[str] = []
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            if self.vision:
                images = [e.image.load() for e in chunk]  # type: ignore[union-attr]
                texts = [
                    processor.apply_chat_template(
                        prepare_multimodal_messages([dict(m) for m in e.prompt], images=[image]),
                        add_generation_prompt=True,
                        tokenize=False,
                    )
                    for e, image in zip(chunk, images, strict=True)
                ]
                inputs = processor(
                    images=images, text=texts, padding=True, padding_side="left", return_tensors="pt",
                    add_special_tokens=False,
                )  # fmt: skip
            else:
                texts = [
                    tokenizer.apply_chat_template(e.prompt, add_generation_prompt=True, tokenize=False)
                    for e in chunk
                ]
                inputs = tokenizer(
                    texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False
                )
            inputs = {k: v.to(self.trainer.args.device) for k, v in inputs.items()}
            output = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            new = output[:, inputs["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
        self.model.train(was_training)
        return answers

    def preferred_rate(
        self, examples: list[PreferenceExample], pattern: str, max_new_tokens: int, batch_size: int
    ) -> tuple[float, list[str]]:
        """Fraction of greedy answers matching ``pattern`` (re.search), and the answers themselves."""
        answers = self.generate(examples, max_new_tokens, batch_size)
        regex = re.compile(pattern)
        hits = sum(1 for a in answers if regex.search(a.strip()))
        return hits / max(len(answers), 1), answers
