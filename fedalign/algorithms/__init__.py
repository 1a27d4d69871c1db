"""Federated LoRA aggregation rules, one module each; every module in this package is imported here so
that its ``@register`` runs (adding an algorithm is adding one file)."""

import importlib
import pkgutil

from fedalign.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    ClientState,
    Factor,
    GradientTerm,
    RunContext,
    Tensors,
    factor_of,
    payload_bytes,
    registry,
    select,
    weighted_sum,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def build(config: AlgorithmConfig, context: RunContext | None = None) -> Algorithm:
    """The algorithm object a recipe's ``algorithm:`` section describes."""
    return registry()[config.name](config, context)  # type: ignore[attr-defined]


__all__ = [
    "Algorithm",
    "AlgorithmConfig",
    "ClientState",
    "Factor",
    "GradientTerm",
    "RunContext",
    "Tensors",
    "build",
    "factor_of",
    "payload_bytes",
    "registry",
    "select",
    "weighted_sum",
]
