"""Example- and pair-level DP-SGD for the trainable LoRA tensors of a PEFT model (Abadi et al., 2016).

One private step replaces ``training_step`` + ``clip_grad_norm_`` before ``optimizer.step()``:

    g = ( Σ_units  g_u · min(1, C/‖g_u‖)  +  N(0, σ²C² I) ) / (q·n)

``g_u`` is one unit's gradient over *all* trainable tensors together. A unit is one example, or, for DPO,
one (chosen, rejected) pair: TRL stacks a DPO batch as ``[chosen; rejected]`` (2B rows), so rows i and
i+B are summed before clipping (clipping rows alone bounds a pair's influence by 2C, not C). The divisor is
the Poisson expectation q·n, never the realised batch size, which would itself leak; an empty draw is still
a step whose gradient is pure noise, as the accountant assumes.

Per-unit gradients come from Opacus hooks (``GradSampleHooks``) on the LoRA ``nn.Linear`` modules, which
cost about what a plain step costs (stack-notes §5). They are only per-example if each unit's loss depends
on that unit alone: HF/TRL's batch-token-mean loss does not (its divisor counts every example's tokens),
hence :func:`per_sequence_loss`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from opacus.grad_sample import GradSampleHooks
from torch import nn

from fedalign.privacy.randomness import SecretRandomness

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
Unit = Literal["example", "pair"]

# Keys that are not model inputs: labels are passed separately, the rest are DPO/bookkeeping columns.
_NON_MODEL_KEYS = {"labels", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
# Padding-free / packed batches put several examples in one row: per-row gradients are then not per-example.
_PACKED_KEYS = {"cu_seq_lens_q", "cu_seq_lens_k", "seq_idx"}


def _has_fused_lm_head(model: nn.Module) -> bool:
    """Whether TRL's ``add_fused_lm_head`` patched this model (SFTTrainer and DPOTrainer both do)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    function = getattr(base.forward, "__func__", None)
    return getattr(getattr(function, "__code__", None), "co_name", "") == "_fused_forward"


def per_sequence_loss(model: nn.Module, inputs: Batch) -> torch.Tensor:
    """Each row's mean next-token NLL over its own completion tokens, shape (rows,).

    Labels are ``inputs["labels"]`` (-100 = not trained), or for DPO batches ``input_ids`` where
    ``completion_mask`` is 1. A row with no completion token gets loss 0 and zero gradient, not NaN. Uses
    TRL's fused LM head (no (rows, T, vocab) logits) when the model has one, plain logits otherwise.
    """
    if "labels" in inputs:
        labels = inputs["labels"]
    else:
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    model_inputs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    if _has_fused_lm_head(model):
        out = model(**model_inputs, labels=labels, fused_lm_head=True, use_cache=False)
        nll, mask = -out.log_probs[:, -(labels.shape[1] - 1) :], out.label_mask[:, -(labels.shape[1] - 1) :]
    else:
        logits = model(**model_inputs, use_cache=False).logits[:, :-1].float()
        shifted = labels[:, 1:]
        nll = nn.functional.cross_entropy(
            logits.transpose(1, 2), shifted, ignore_index=-100, reduction="none"
        )
        mask = shifted != -100
    return nll.sum(dim=1) / mask.sum(dim=1).clamp(min=1).to(nll.dtype)


def poisson_batches(
    num_rows: int, sample_rate: float, steps: int, randomness: SecretRandomness
) -> Iterator[list[int]]:
    """Row indices for ``steps`` batches, each row in each batch independently with probability q.

    This is the sampling the accountants' subsampled-Gaussian analysis assumes: batch sizes vary and may be
    zero. Step ``i`` draws from ``randomness.child(i)`` only: secret, and replayable by the key's holder.
    """
    if num_rows < 0 or steps < 0 or not 0.0 <= sample_rate <= 1.0:
        raise ValueError(f"poisson_batches: need num_rows, steps >= 0 and 0 <= q <= 1, got q={sample_rate}")

    def draws() -> Iterator[list[int]]:
        for step in range(steps):
            yield randomness.child(step).bernoulli(num_rows, sample_rate)

    return draws()


def check_checkpointing(model: nn.Module) -> None:
    """Raise unless activation checkpointing is off or reentrant.

    Non-reentrant checkpointing (transformers' default) recomputes the forward inside autograd's saved-tensor
    hooks, where Opacus' module hooks never see activations: ``grad_sample`` stays None (stack-notes §5).
    """
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is not True:
            continue
        function = getattr(module, "_gradient_checkpointing_func", None)
        keywords = function.keywords if isinstance(function, functools.partial) else {"use_reentrant": False}
        if keywords.get("use_reentrant", True) is not True:  # torch's own default when unset is reentrant
            raise ValueError(
                "DP-SGD cannot run with non-reentrant activation checkpointing: Opacus' per-example gradient "
                "hooks see nothing through it. Set train.gradient_checkpointing: false, or enable it with "
                "activation_checkpointing_kwargs={'use_reentrant': True}."
            )


@dataclass(frozen=True)
class StepInfo:
    """What one private step saw. Only for logging: these numbers are not private."""

    batch_size: int  # realised units (examples or pairs)
    loss_sum: float
    clipped: int  # units whose gradient norm exceeded C

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.batch_size if self.batch_size else math.nan

    @property
    def clipped_fraction(self) -> float:
        return self.clipped / self.batch_size if self.batch_size else 0.0


class PrivateGradientStep:
    """Clipped, noised gradient of one Poisson batch, written into ``p.grad`` of the trainable tensors.

    Attach after the model is on its device and after ``requires_grad`` is final (e.g. FFA-LoRA's frozen
    A): hooks go on the modules that own trainable tensors at construction. Then, per optimizer step::

        info = private.step(batch_or_micro_batches, expected_batch_size=q * n)
        optimizer.step(); optimizer.zero_grad()

    ``noise`` is the only randomness used: step ``i`` draws from ``noise.child(i)`` unless the caller passes
    its own stream to :meth:`step` (see :mod:`fedalign.privacy.randomness`; never a seeded generator).
    Call :meth:`detach` (or use as a context manager) to remove the hooks and Opacus' attributes.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        clip_norm: float,
        noise_multiplier: float,
        unit: Unit,
        noise: SecretRandomness,
    ) -> None:
        if not clip_norm > 0 or not (0 <= noise_multiplier < math.inf):
            raise ValueError(
                f"need clip_norm > 0 and finite noise_multiplier >= 0, got {clip_norm}, {noise_multiplier}"
            )
        if noise_multiplier > 0 and math.isinf(clip_norm):
            raise ValueError("noise_multiplier > 0 needs a finite clip_norm (the noise std is σ·C)")
        if unit not in ("example", "pair"):
            raise ValueError(f"unit must be 'example' or 'pair', got {unit!r}")
        check_checkpointing(model)
        self.model, self.unit, self.noise = model, unit, noise
        self._steps = 0
        self.clip_norm, self.noise_multiplier = float(clip_norm), float(noise_multiplier)
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no trainable parameters to privatise")
        self._hooks: GradSampleHooks | None = GradSampleHooks(model, loss_reduction="sum", strict=True)

    def __enter__(self) -> PrivateGradientStep:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def detach(self) -> None:
        """Remove the hooks and the ``grad_sample`` attributes; the model is then an ordinary model."""
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None

    def unit_gradients(
        self, inputs: Batch, loss_fn: LossFn = per_sequence_loss
    ) -> tuple[list[torch.Tensor], float]:
        """Forward and backward of Σ losses on one (micro-)batch; each unit's unclipped gradient, in float32.

        Returns one (units, *param.shape) tensor per trainable parameter (``self.params`` order) and the
        summed loss. ``loss_fn`` may return one loss per unit, per row (folded for pairs), or their sum.
        """
        if self._hooks is None:
            raise RuntimeError("PrivateGradientStep was detached")
        if _PACKED_KEYS & inputs.keys():
            raise ValueError(
                "DP-SGD needs one example per row: padding-free/packed batches are not supported"
            )
        current = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        if current.keys() != self.params.keys() or any(p is not self.params[n] for n, p in current.items()):
            raise RuntimeError("trainable parameters changed since the hooks were attached; attach again")
        device = next(iter(self.params.values())).device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        self.model.train()  # Opacus records activations only in training mode (as Trainer.training_step)
        for p in self.params.values():
            p.grad, p.grad_sample = None, None
        loss = loss_fn(self.model, inputs).sum()
        with warnings.catch_warnings():  # the first layer's lora_A input (frozen embeddings) needs no grad
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            loss.backward()
        grads = []
        for name, p in self.params.items():
            sample = p.grad_sample
            if not torch.is_tensor(sample):
                raise RuntimeError(
                    f"no single per-example gradient for {name} (got {type(sample).__name__}): frozen or "
                    "re-created after attaching, used twice per forward, or under non-reentrant checkpointing"
                )
            sample = sample.float()
            if self.unit == "pair":
                if sample.shape[0] % 2:
                    raise ValueError(
                        f"unit 'pair' needs [chosen; rejected] batches of 2B rows, got {sample.shape[0]}"
                    )
                half = sample.shape[0] // 2
                sample = sample[:half] + sample[half:]
            grads.append(sample)
            p.grad, p.grad_sample = None, None
        return grads, float(loss.detach())

    def step(
        self,
        inputs: Batch | Sequence[Batch] | None,
        expected_batch_size: float,
        loss_fn: LossFn = per_sequence_loss,
        noise: SecretRandomness | None = None,
    ) -> StepInfo:
        """Set ``p.grad`` to the private gradient of one logical batch; the caller runs the optimizer.

        ``inputs`` is a collated batch, a sequence of micro-batches of one Poisson draw (clipped one by one,
        noised once), or None/[] for an empty draw, which yields the noise-only gradient without running the
        model. ``expected_batch_size`` is q·n in units (pairs for ``unit='pair'``). ``noise``: this step's
        stream (default: the next child of the constructor's).
        """
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        micro = [] if inputs is None else [inputs] if isinstance(inputs, Mapping) else list(inputs)
        sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params.values()]
        units = clipped = 0
        loss_sum = 0.0
        for batch in micro:
            if batch["input_ids"].shape[0] == 0:
                continue
            grads, batch_loss = self.unit_gradients(batch, loss_fn)
            norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
            scale = (self.clip_norm / norms).clamp(max=1.0)  # C/0 = inf -> 1: a zero gradient stays zero
            for total, g in zip(sums, grads, strict=True):
                total += torch.einsum("u,u...->...", scale, g)
            units += int(norms.shape[0])
            clipped += int((norms > self.clip_norm).sum())
            loss_sum += batch_loss
        std = self.noise_multiplier * self.clip_norm
        if noise is None:
            noise = self.noise.child(self._steps)
        self._steps += 1
        if std > 0:  # one draw for all tensors of the step, split in parameter order
            flat = noise.gaussian(sum(t.numel() for t in sums), std, device=sums[0].device)
            for total, values in zip(sums, flat.split([t.numel() for t in sums]), strict=True):
                total += values.view(total.shape).to(total.device)
        for total, p in zip(sums, self.params.values(), strict=True):
            p.grad = (total / expected_batch_size).to(p.dtype)
        return StepInfo(batch_size=units, loss_sum=loss_sum, clipped=clipped)


@dataclass(frozen=True)
class ParameterSnapshot:
    """Copies of the trainable tensors and float64 fingerprints of the frozen ones (no full base copy)."""

    trainable: dict[str, torch.Tensor]
    frozen: dict[str, tuple[float, float]]


def _fingerprint(tensor: torch.Tensor, chunk: int = 1 << 24) -> tuple[float, float]:
    """Float64 sum and sum of squares, in chunks so a large embedding never gets a full float64 copy."""
    flat = tensor.detach().reshape(-1)
    total = squares = 0.0
    for start in range(0, flat.numel(), chunk):
        values = flat[start : start + chunk].double()
        total, squares = total + float(values.sum()), squares + float((values * values).sum())
    return total, squares


@torch.no_grad()
def snapshot(model: nn.Module) -> ParameterSnapshot:
    """State to compare against after the first private step (see :func:`assert_only_lora_changed`)."""
    trainable, frozen = {}, {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable[name] = p.detach().clone()
        else:
            frozen[name] = _fingerprint(p)
    return ParameterSnapshot(trainable, frozen)


@torch.no_grad()
def assert_only_lora_changed(before: ParameterSnapshot, model: nn.Module) -> None:
    """Raise RuntimeError unless every trainable tensor moved and no frozen one did.

    Guards against opacus#820: with some PEFT/device-placement orders the optimizer updates tensors that are
    not the model's, so the loss falls in the logs while the adapter never changes (or the base does).
    Run after the first optimizer step; with σ > 0 every trainable tensor receives noise, so all must move.
    """
    params = dict(model.named_parameters())
    if params.keys() != before.trainable.keys() | before.frozen.keys():
        raise RuntimeError("the model's parameter names changed since the snapshot")
    moved = sorted(n for n, fp in before.frozen.items() if _fingerprint(params[n]) != fp)
    stuck = sorted(n for n, t in before.trainable.items() if torch.equal(params[n].detach(), t))
    if moved or stuck:
        raise RuntimeError(
            f"private step sanity check failed (opacus#820): frozen tensors changed {moved[:5]}, "
            f"trainable tensors unchanged {stuck[:5]}; attach LoRA before moving the model to its device and "
            "build the optimizer over the model's own trainable parameters"
        )
