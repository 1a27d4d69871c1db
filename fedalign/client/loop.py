"""One client visit on a TRL trainer: exactly K optimizer steps, plain or DP-SGD, shared by SFT and DPO.

A visit does not call ``Trainer.train()``: that would rebuild the accelerator state and run a full garbage
collection every time (about 0.28 s per client visit, measured on OpenFedLLM's loop), which is most of
the gap between federated loops and bare TRL. Instead a visit runs the same inner step the Trainer runs
(gradient accumulation, the trainer's own ``training_step`` and ``compute_loss``, clipping, optimizer and
scheduler step) for exactly K optimizer steps, with the client's own optimizer (fresh by default, or
restored from the client's saved state). Under DP the step is :class:`PrivateGradientStep` instead, on
the trainer's own loss per unit (an example for SFT, a preference pair for DPO).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from fedalign.algorithms.base import Tensors
from fedalign.privacy.dpsgd import (
    LossFn,
    PrivateGradientStep,
    assert_only_lora_changed,
    per_sequence_loss,
    poisson_batches,
    snapshot,
)
from fedalign.privacy.randomness import SecretRandomness
from fedalign.recipe import PrivacySection, TrainSection


def select_view(dataset: Any, positions: list[int]) -> Any:
    """Rows ``positions`` of a ``datasets.Dataset``, as a view (no copy), made when a client trains.

    ``datasets`` names a selection by hashing its index list, most of the 11 ms a 2,400-row view costs; a
    digest of the positions' bytes names it as uniquely in 2.7 ms in all (the name only keys caches of
    ``map`` results, and client views are never mapped).
    """
    digest = hashlib.blake2b(array("q", positions).tobytes(), digest_size=16).hexdigest()
    return dataset.select(positions, new_fingerprint=digest)


@dataclass
class LocalResult:
    """What one client visit did: its optimizer steps, their losses, the data it consumed.

    Under DP a step whose Poisson draw is empty still happens (a noise-only update) but has no loss, so
    ``losses`` may be shorter than ``steps``. ``examples`` counts units (rows for SFT, pairs for DPO).
    """

    steps: int
    losses: list[float]
    examples: int
    tokens: int
    optimizer_state: Tensors = field(default_factory=dict)

    @property
    def mean_loss(self) -> float | None:
        return sum(self.losses) / len(self.losses) if self.losses else None


class VisitBatches:
    """Batch indices for one visit: passes over the client's rows in an order drawn from ``generator``.

    Each pass is a fresh permutation (sampling without replacement within a pass), repeated as often as
    the visit's ``count`` batches need. A batch never holds a row twice: when a pass ends inside a batch,
    the rows of the next pass that are already in that batch go to the end of that pass. The order depends
    only on the generator, which the runtime seeds from (run seed, client, round), so a visit is
    reproducible and resumable without stored cursors. (Non-private training only: DP-SGD draws Poisson
    batches from the client's secret, see :func:`~fedalign.privacy.dpsgd.poisson_batches`.)
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
                    fresh = torch.randperm(self.num_rows, generator=self.generator).tolist()
                    taken = set(batch)  # order is consumed from its end: rows already taken go first
                    order = [r for r in fresh if r in taken] + [r for r in fresh if r not in taken]
                batch.append(order.pop())
            yield batch


class VisitLoop:
    """Drives client visits through one TRL trainer (built and owned by the SFT or DPO client).

    ``count`` tells what a collated batch holds: (units, trained tokens). ``unit`` and ``private_loss``
    choose DP-SGD's privacy unit and its loss (per sequence for SFT; the summed per-pair DPO loss).
    """

    def __init__(
        self,
        trainer: Any,
        train: TrainSection,
        count: Callable[[dict[str, Any]], tuple[int, int]],
        *,
        unit: str = "example",
        private_loss: Callable[[], LossFn] = lambda: per_sequence_loss,
    ) -> None:
        self.trainer, self.train_cfg, self.count = trainer, train, count
        self.model = trainer.model
        self.unit, self._private_loss = unit, private_loss
        self._privacy: tuple[PrivacySection, float] | None = None
        self._private: PrivateGradientStep | None = None
        self._private_for: tuple[str, ...] = ()
        self._guard_passed = False
        self._before_step: Callable[[], None] | None = None
        if train.gradient_checkpointing:
            self.enable_activation_checkpointing()

    def enable_activation_checkpointing(self, reentrant: bool = False) -> None:
        """What ``Trainer.train()`` would do at its start (we never call it): checkpoint activations.

        Per-sample gradient hooks see nothing through non-reentrant checkpointing, so DP asks for reentrant.
        """
        args = self.trainer.args
        kwargs = dict(
            getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {}
        )
        kwargs["use_reentrant"] = reentrant
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5.x names
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        args.gradient_checkpointing_kwargs = kwargs  # TRL's reference pass toggles it with these

    # -- optimizer state ----------------------------------------------------------------------------------
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

    # -- privacy ------------------------------------------------------------------------------------------
    def make_private(self, privacy: PrivacySection, noise_multiplier: float) -> None:
        """Switch local training to DP-SGD (per-unit clipping, Gaussian noise, Poisson sampling)."""
        if self.train_cfg.gradient_checkpointing:
            self.enable_activation_checkpointing(reentrant=True)
        self._privacy = (privacy, noise_multiplier)

    def _private_step(self, noise: SecretRandomness) -> PrivateGradientStep:
        """The per-sample gradient hooks for the current trainable set (re-attached if it changed)."""
        trainable = tuple(n for n, p in self.model.named_parameters() if p.requires_grad)
        if self._private is None or self._private_for != trainable:
            if self._private is not None:
                self._private.detach()
            assert self._privacy is not None
            privacy, sigma = self._privacy
            self._private = PrivateGradientStep(
                self.model,
                clip_norm=privacy.clip_norm,
                noise_multiplier=sigma,
                unit=self.unit,  # type: ignore[arg-type]
                noise=noise,
            )
            self._private_for = trainable
        self._private.noise = noise
        return self._private

    # -- a visit ------------------------------------------------------------------------------------------
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
        """Run ``steps`` optimizer steps on ``rows`` (a client's rows: anything indexable the collator takes)
        with a new (or the given) optimizer state.

        ``generator`` orders non-private batches. Private runs only: ``sample_rate`` is the Poisson rate at
        which each step draws the client's rows, and ``randomness`` (the client's secret for this visit)
        decides those draws and the noise. ``before_step`` runs after the gradient is formed and before the
        optimizer uses it (the algorithm's extra gradient term).
        """
        self._before_step = before_step
        trainer = self.trainer
        trainer.optimizer, trainer.lr_scheduler = None, None
        trainer.create_optimizer_and_scheduler(num_training_steps=steps)
        if optimizer_state:
            self._load_optimizer_state(optimizer_state)
        if self._privacy is None:
            result = self._plain_steps(rows, steps, generator)
        else:
            if sample_rate is None or randomness is None:
                raise ValueError("a private visit needs its sample_rate and the client's secret randomness")
            result = self._private_steps(rows, steps, randomness, sample_rate)
        for values in trainer._metrics["train"].values():  # TRL appends per-step metrics; we log our own
            values.clear()
        if self.train_cfg.optimizer_state == "persist":
            result.optimizer_state = self._optimizer_state()
        trainer.optimizer, trainer.lr_scheduler = None, None
        return result

    def _optimizer_step(self) -> None:
        if self._before_step is not None:
            self._before_step()
        self.trainer.optimizer.step()
        self.trainer.lr_scheduler.step()
        self.model.zero_grad(set_to_none=True)

    def _plain_steps(self, rows: Any, steps: int, generator: torch.Generator) -> LocalResult:
        trainer, cfg = self.trainer, self.train_cfg
        batch_count = steps * cfg.gradient_accumulation_steps
        loader = DataLoader(
            rows,
            batch_sampler=VisitBatches(len(rows), cfg.batch_size, batch_count, generator),
            collate_fn=trainer.data_collator,
        )
        batches = iter(loader)
        params = [p for p in self.model.parameters() if p.requires_grad]
        result = LocalResult(steps=steps, losses=[], examples=0, tokens=0)
        for _ in range(steps):
            micro, num_items = trainer.get_batch_samples(
                batches, cfg.gradient_accumulation_steps, trainer.args.device
            )
            trainer.current_gradient_accumulation_steps = len(micro)
            step_loss = torch.zeros((), device=trainer.args.device)
            for inputs in micro:
                units, tokens = self.count(inputs)
                result.examples += units
                result.tokens += tokens
                step_loss += trainer.training_step(self.model, inputs, num_items)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            self._optimizer_step()  # the algorithm's term comes after clipping, as in DP where it must
            result.losses.append(float(step_loss))
        return result

    def _private_steps(
        self, rows: Any, steps: int, randomness: SecretRandomness, sample_rate: float
    ) -> LocalResult:
        noise = randomness.child("noise")
        private = self._private_step(noise)
        loss_fn = self._private_loss()
        device = self.trainer.args.device
        result = LocalResult(steps=steps, losses=[], examples=0, tokens=0)
        batches = poisson_batches(len(rows), sample_rate, steps, randomness.child("rows"))
        for step, indices in enumerate(batches):
            inputs = None
            if indices:
                batch = self.trainer.data_collator([rows[i] for i in indices])
                inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                units, tokens = self.count(batch)
                result.examples += units
                result.tokens += tokens
            guard = snapshot(self.model) if not self._guard_passed else None
            info = private.step(
                inputs, expected_batch_size=sample_rate * len(rows), loss_fn=loss_fn, noise=noise.child(step)
            )
            self._optimizer_step()
            if guard is not None and private.noise_multiplier > 0:
                assert_only_lora_changed(guard, self.model)  # opacus#820: hooks attached to the placed model
                self._guard_passed = True
            if info.batch_size:
                result.losses.append(info.mean_loss)
        return result
