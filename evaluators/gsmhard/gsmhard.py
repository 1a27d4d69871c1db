"""GSM-hard (PAL's gsmhardv2: GSM8K test questions with large numbers, float targets) scored with PAL's
tolerance, ``abs(answer - target) < 1e-3``, on the answers lm-evaluation-harness's GSM8K filters extract
(strict-match, flexible-extract). lm-eval has no GSM-hard task; the prompts are GSM8K's, with
``question = input``. ``evaluate.load("evaluators/gsmhard").compute(predictions=..., references=[target,
...], variant="gsm8k_cot", mode="faithful")``. mode='corrected' adds a relative tolerance (1e-6 of the
target), since 1e-3 is tighter than a float's precision beyond about 1e12 and targets reach 9.3e12."""

from __future__ import annotations

import math

import datasets
import evaluate

# GSM8K's extraction, from the installed package (fedalign's evaluators): evaluate.load copies only files of
# this folder, so this module needs fedalign installed; evaluators/gsm8k loads on its own.
from evaluators.gsm8k.extraction import (
    INVALID,
    VARIANTS,
    aggregate,
    score_filters,
    to_number,
)

_DESCRIPTION = "GSM-hard accuracy with PAL's absolute tolerance 1e-3, per lm-eval GSM8K filter."
_KWARGS = """
predictions: list of model responses.
references: list of float targets (gsmhardv2's ``target``; kept as upstream, including its wrong entries).
variant: the GSM8K prompt family whose strict regex applies (gsm8k, gsm8k_cot, ...).
mode: 'faithful' (PAL tolerance) or 'corrected' (adds relative tolerance 1e-6).
"""


def within(prediction: str, target: float, relative: bool = False) -> bool:
    value = to_number(prediction)
    if value is None:
        return False
    if abs(value - target) < 1e-3:
        return True
    return relative and math.isclose(value, target, rel_tol=1e-6)


def score(response: str, target: float, variant: str, mode: str = "faithful") -> dict[str, object]:
    return score_filters(
        response,
        variant,
        mode,
        ("accuracy", "relative"),
        lambda answer: within(answer, target),
        lambda answer: within(answer, target, relative=True),
    )


class GSMHard(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Gao et al., PAL: Program-aided Language Models, 2023",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references, variant: str = "gsm8k_cot", mode: str = "faithful"):
        if variant not in VARIANTS:
            raise ValueError(f"unknown GSM8K variant {variant!r} (one of {', '.join(VARIANTS)})")
        return aggregate(
            [score(p, float(t), variant, mode) for p, t in zip(predictions, references, strict=True)]
        )


__all__ = ["INVALID", "GSMHard", "score"]
