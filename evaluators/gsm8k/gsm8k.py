"""GSM8K exact match as lm-evaluation-harness reports it (``strict-match``, ``flexible-extract``), as a
Hugging Face ``evaluate`` module: ``evaluate.load("evaluators/gsm8k").compute(predictions=...,
references=..., variant="gsm8k_cot", mode="faithful")``. No generation; see README.md."""

from __future__ import annotations

import datasets
import evaluate

# relative, so that evaluate.load copies the sibling file and the module loads without fedalign
from .extraction import VARIANTS, aggregate, score

_DESCRIPTION = """Exact match of a model's GSM8K answers under lm-evaluation-harness's two filters:
strict-match (the variant's answer regex, first match) and flexible-extract (the last number).
mode='corrected' adds numeric scores with the strict regex fixed (see extraction.py)."""
_KWARGS = """
predictions: list of model responses (the generated text after the prompt).
references: list of gold answers: the GSM8K ``answer`` field ("...\\n#### 18") or the number alone.
variant: the prompt family, which decides the strict regex: gsm8k (5-shot "Question: ... Answer:"),
    gsm8k_cot (8-shot "Q: ... A:", "The answer is N."), gsm8k_cot_zeroshot, kpmath_zeroshot, gsm8k_chat.
mode: 'faithful' (lm-eval's numbers) or 'corrected' (adds numeric,strict-match and numeric,flexible-extract).
Returns: exact_match,<filter> in [0, 1], invalid,<filter> counts, and the number of samples.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class GSM8K(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Cobbe et al., Training Verifiers to Solve Math Word Problems, 2021",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, variant: str = "gsm8k_cot", mode: str = "faithful"):
        if variant not in VARIANTS:
            raise ValueError(f"unknown GSM8K variant {variant!r} (one of {', '.join(VARIANTS)})")
        rows = [score(p, r, variant, mode) for p, r in zip(predictions, references, strict=True)]
        return aggregate(rows)
