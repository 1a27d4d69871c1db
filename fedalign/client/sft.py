"""Local SFT on TRL's ``SFTTrainer``: the one module that knows TRL and ``Trainer`` internals.

One trainer is built per run. Its construction tokenizes every training row once (TRL's own chat-template
tokenization, completion mask and truncation), and its collator, loss (``compute_loss``: completion tokens
only, EOS included) and ``training_step`` are what each client visit runs. A visit does not call
``Trainer.train()``: that would rebuild the accelerator state and run a full garbage collection every
time (about 0.28 s per client visit, measured on OpenFedLLM's loop), which is most of the gap between
federated loops and bare TRL. Instead a visit runs the same inner step the Trainer runs (gradient
accumulation, ``training_step``, clipping, optimizer and scheduler step) for exactly K optimizer steps,
with the client's own optimizer (fresh by default, or restored from the client's saved state).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from fedalign.algorithms.base import Tensors
from fedalign.recipe import TrainSection

_COLUMNS = ["input_ids", "labels"]


@dataclass
class LocalResult:
    """What one client visit did: losses per optimizer step and the data it consumed."""

    losses: list[float]
    examples: int
    tokens: int
    optimizer_state: Tensors = field(default_factory=dict)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses)


class VisitBatches:
    """Batch indices for one visit: passes over the client's rows in an order drawn from ``generator``.

    Each pass is a fresh permutation (sampling without replacement within a pass), repeated as often as
    the visit's ``count`` batches need. The order depends only on the generator, which the runtime seeds
    from (run seed, client, round), so a visit is reproducible and resumable without stored cursors.
    """

    def __init__(self, num_rows: int, batch_size: int, count: int, generator: torch.Generator) -> None:
        self.num_rows, self.batch_size, self.count, self.generator = num_rows, batch_size, count, generator

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[list[int]]:
        order: list[int] = []
        for _ in range(self.count):
            batch: list[int] = []
            while len(batch) < min(self.batch_size, self.num_rows):
                if not order:
                    order = torch.randperm(self.num_rows, generator=self.generator).tolist()
                batch.append(order.pop())
            yield batch


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
        if train.gradient_checkpointing:
            self._enable_activation_checkpointing()
        tokenized = self.trainer.train_dataset
        self._position = {row_id: i for i, row_id in enumerate(tokenized["row_id"])}
        self.dropped_rows = sorted({r["row_id"] for r in records} - set(self._position))
        self._tokenized = tokenized.select_columns(_COLUMNS)
        evaluation = self.trainer.eval_dataset
        self.eval_rows: Dataset | None = (
            evaluation.select_columns(_COLUMNS) if evaluation is not None else None
        )
        self.dropped_eval_rows = (
            sorted({r["row_id"] for r in eval_records} - set(evaluation["row_id"])) if eval_records else []
        )

    def _enable_activation_checkpointing(self) -> None:
        """What ``Trainer.train()`` would do at its start (we never call it): checkpoint activations."""
        args = self.trainer.args
        kwargs = dict(
            getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {}
        )
        kwargs.setdefault("use_reentrant", False)
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5.x names
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # -- data -------------------------------------------------------------------------------------------
    def rows(self, row_ids: list[int]) -> Dataset:
        """The tokenized rows of one client (a view, no copy)."""
        return self._tokenized.select([self._position[r] for r in row_ids])

    # -- training ---------------------------------------------------------------------------------------
    def _optimizer_state(self) -> Tensors:
        names = {id(p): n for n, p in self.model.named_parameters()}
        optimizer = self.trainer.optimizer
        flat: Tensors = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                for key, value in optimizer.state.get(param, {}).items():
                    tensor = value if torch.is_tensor(value) else torch.tensor(value)
                    flat[f"{names[id(param)]}::{key}"] = tensor.detach().to("cpu", copy=True)
        return flat

    def _load_optimizer_state(self, flat: Tensors) -> None:
        optimizer = self.trainer.optimizer
        for name, param in self.model.named_parameters():
            entries = {k.split("::", 1)[1]: v for k, v in flat.items() if k.split("::", 1)[0] == name}
            if entries and param.requires_grad:
                optimizer.state[param] = {k: v.to(param.device) for k, v in entries.items()}

    def train(
        self, rows: Dataset, steps: int, generator: torch.Generator, optimizer_state: Tensors | None = None
    ) -> LocalResult:
        """Run ``steps`` optimizer steps on ``rows`` with a new (or the given) optimizer state."""
        trainer, cfg = self.trainer, self.train_cfg
        trainer.optimizer, trainer.lr_scheduler = None, None
        trainer.create_optimizer_and_scheduler(num_training_steps=steps)
        if optimizer_state:
            self._load_optimizer_state(optimizer_state)
        loader = DataLoader(
            rows,
            batch_sampler=VisitBatches(
                len(rows), cfg.batch_size, steps * cfg.gradient_accumulation_steps, generator
            ),
            collate_fn=trainer.data_collator,
        )
        batches = iter(loader)
        params = [p for p in self.model.parameters() if p.requires_grad]
        losses: list[float] = []
        examples = tokens = 0
        for _ in range(steps):
            micro, num_items = trainer.get_batch_samples(
                batches, cfg.gradient_accumulation_steps, trainer.args.device
            )
            trainer.current_gradient_accumulation_steps = len(micro)
            step_loss = torch.zeros((), device=trainer.args.device)
            for inputs in micro:
                examples += int(inputs["input_ids"].shape[0])
                tokens += int((inputs["labels"] != -100).sum())
                step_loss += trainer.training_step(self.model, inputs, num_items)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            self.model.zero_grad(set_to_none=True)
            losses.append(float(step_loss))
        for values in trainer._metrics["train"].values():  # TRL appends per-step metrics; we log our own
            values.clear()
        state = self._optimizer_state() if cfg.optimizer_state == "persist" else {}
        trainer.optimizer, trainer.lr_scheduler = None, None
        return LocalResult(losses=losses, examples=examples, tokens=tokens, optimizer_state=state)

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
