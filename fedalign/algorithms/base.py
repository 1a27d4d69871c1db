"""The linear protocol every federated LoRA algorithm fits.

A round runs one or more *stages*. In each stage every selected client uploads named tensors, the
runtime forms their weighted sum Σ wᵢ·uᵢ (the only thing the server ever sees, so secure aggregation fits
without touching an algorithm), and the server turns that sum into either a reply for the next stage or,
after the last stage, the new global adapter.

Algorithms are pure tensor math: no TRL, no I/O, no device placement. Tensors are keyed by the PEFT
state-dict names of the adapter (``...q_proj.lora_A.weight``), so a message is self-describing and can be
checked key by key on either side of a wire.

To add an algorithm, write one module in this package that defines a config (a pydantic model with a
``name`` literal) and a class decorated with :func:`register`; it is discovered automatically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

Tensors = dict[str, torch.Tensor]
Factor = Literal["A", "B", "full"]  # "full": a fully trained module (PEFT modules_to_save)
GradientTerm = Callable[[str, torch.Tensor], torch.Tensor]  # (key, current value) -> gradient to add


@dataclass(frozen=True)
class RunContext:
    """What an algorithm may need to know about the run it serves (beyond its own recipe section)."""

    num_clients: int = 1
    clients_per_round: int = 1
    local_steps: int = 1
    learning_rate: float = 1e-3
    seed: int = 0


class AlgorithmConfig(BaseModel):
    """Base of every algorithm's recipe section (``algorithm:``); subclasses add a ``name`` literal."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data):
        """``mu: true`` would be 1 (a model validator: ``name`` is the union's discriminator)."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and field.annotation in (int, float):
                    raise ValueError(f"{key}: expected a number, got {str(value).lower()}")
        return data


def factor_of(key: str) -> Factor | None:
    """Which LoRA factor a PEFT state-dict key belongs to: ``A``, ``B``, ``full`` for a fully trained module
    (PEFT ``modules_to_save``, e.g. a LLaVA projector trained in full), ``None`` for anything else."""
    if ".lora_A." in key:
        return "A"
    if ".lora_B." in key:
        return "B"
    if ".modules_to_save." in key:
        return "full"
    return None


def select(tensors: Tensors, factors: frozenset[Factor] | set[Factor]) -> Tensors:
    """The sub-dictionary holding only the given LoRA factors."""
    return {k: v for k, v in tensors.items() if factor_of(k) in factors}


def payload_bytes(tensors: Tensors) -> int:
    """Bytes of tensor data in a message: what crosses the client/server boundary."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def weighted_sum(uploads: list[Tensors], weights: list[float]) -> Tensors:
    """Σ wᵢ·uᵢ key by key, in float32, in the given order: the only server-side view of a stage."""
    summed: Tensors = {}
    for upload, weight in zip(uploads, weights, strict=True):
        for key, value in upload.items():
            term = value.float() * weight
            summed[key] = summed[key] + term if key in summed else term
    return summed


@dataclass
class ClientState:
    """What a client keeps between its visits (off the accelerator; persisted to disk by the runtime).

    ``tensors`` is the algorithm's own per-client state (e.g. FedSA-LoRA's local B, SCAFFOLD variates);
    ``optimizer`` is the local optimizer's state when the recipe persists it.
    """

    tensors: Tensors = field(default_factory=dict)
    optimizer: Tensors = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not self.tensors and not self.optimizer


class Algorithm:
    """Defaults for a one-stage algorithm in which clients train both factors and upload them all.

    Subclasses override only what differs. The runtime calls, per round ``t``:

    1. ``broadcast(t, glob)`` once; the result goes to every selected client (counted as downlink);
    2. per client: ``local_start(t, received, state)`` gives the adapter tensors to load before training;
       training runs on the factors in ``trainable(t)``;
    3. per stage ``s``: ``client_upload(s, t, trained, reply, state)`` from every client, the runtime sums
       them with weights, and ``server_step(s, t, summed, glob)`` returns the next reply (stage < last,
       sent to every client, counted as downlink) or the new global adapter (last stage);
    4. per client: ``local_end(t, trained, state)`` returns what the client keeps.
    """

    name: ClassVar[str]
    num_stages: ClassVar[int] = 1
    # Client-level DP clips each client's change to what it uploads, so the upload must be the trained
    # factors themselves (one stage, keys a subset of the broadcast). Sketches and residual resets are not.
    client_level_dp: ClassVar[bool] = True
    # Fully trained modules (``full`` tensors) train every round and are averaged like any upload. Algorithms
    # whose server step is specific to LoRA factor pairs (sketches, residual resets) set this to False.
    full_tensors: ClassVar[bool] = True
    config_class: ClassVar[type[AlgorithmConfig]]

    def __init__(self, config: AlgorithmConfig, context: RunContext | None = None) -> None:
        self.config = config
        self.context = context or RunContext()

    def trainable(self, round_idx: int) -> frozenset[Factor]:
        return frozenset({"A", "B", "full"})

    def init_global(self, initial: Tensors) -> Tensors:
        """The server's global adapter at round 0, from the adapter every client also starts from."""
        return {k: v.clone() for k, v in initial.items()}

    def broadcast(self, round_idx: int, glob: Tensors) -> Tensors:
        return select(glob, self.trainable(round_idx))

    def local_start(self, round_idx: int, received: Tensors, state: ClientState) -> Tensors:
        """Tensors to write into the client's adapter before local training (the rest stay as they are)."""
        return received

    def begin_aggregation(self, round_idx: int, survivors: int) -> None:
        """Called before a round's uploads are aggregated, with how many clients' uploads are in it (fewer
        than ``clients_per_round`` when some failed). Stateless rules ignore it."""

    def uploaded_factors(self, round_idx: int) -> frozenset[Factor]:
        """The factors a one-stage upload carries: the trained ones by default. Client-level DP noises
        exactly these (so RoLoRA's inactive factor and FedSA-LoRA's private B get none)."""
        return self.trainable(round_idx)

    def client_upload(
        self, stage: int, round_idx: int, trained: Tensors, reply: Tensors, state: ClientState
    ) -> Tensors:
        return select(trained, self.uploaded_factors(round_idx))

    def server_step(self, stage: int, round_idx: int, summed: Tensors, glob: Tensors) -> Tensors:
        """Replace the uploaded tensors of the global adapter by their weighted average."""
        return {**glob, **{k: v.clone() for k, v in summed.items()}}

    def local_end(self, round_idx: int, trained: Tensors, state: ClientState) -> ClientState:
        return state

    # Algorithms that change the frozen base weights (FRLoRA) set this and implement the two methods below.
    moves_base: ClassVar[bool] = False

    def init_from_base(
        self, base: Tensors, initial: Tensors, scalings: dict[str, float]
    ) -> tuple[Tensors, Tensors]:
        """(the adapter to start from, additive change of each module's base weight), from the pretrained
        base weights (keyed by module), the seed-initialised adapter and each module's LoRA scale α/r."""
        raise NotImplementedError

    def take_base_update(self) -> Tensors:
        """The base-weight change decided by the last server step (then forgotten), as low-rank factors
        ``{module}::up`` (d×q) and ``{module}::down`` (q×k) whose product is the additive change of the
        module's weight (see :func:`low_rank_delta`). Factors, not the dense d×k change: that is what a run
        keeps per round to rebuild the base on resume, and what crosses a wire."""
        raise NotImplementedError

    def state_dict(self) -> Tensors:
        """The server-side state this algorithm carries from round to round beyond the global adapter
        (SCAFFOLD's control variate), to be checkpointed. What follows from the round index (RoLoRA's phase)
        or is rebuilt from the run's start (FRLoRA's principal factors) is not state."""
        return {}

    def load_state_dict(self, state: Tensors) -> None:
        """Restore :meth:`state_dict` after :meth:`init_global` (a resumed run)."""
        if state:
            raise ValueError(f"{self.name} keeps no server state, got {sorted(state)[:3]}")

    def gradient_term(self, round_idx: int, received: Tensors, state: ClientState) -> GradientTerm | None:
        """An extra gradient for each trainable LoRA tensor at every local step (FedProx's proximal pull,
        SCAFFOLD's control variates), added after the data gradient (and after DP noise: it is a function
        of public values and the model, so privacy is unaffected). ``None``: plain local training."""
        return None


UP, DOWN = "::up", "::down"


def low_rank_delta(factors: Tensors) -> Tensors:
    """Module -> the dense change ``up @ down`` of a :meth:`Algorithm.take_base_update`."""
    modules = [k.removesuffix(UP) for k in factors if k.endswith(UP)]
    return {m: factors[m + UP].float() @ factors[m + DOWN].float() for m in modules}


_REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make an algorithm available to recipes under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"algorithm {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Algorithm]]:
    return dict(_REGISTRY)
