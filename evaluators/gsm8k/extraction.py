"""GSM8K answer extraction and matching exactly as lm-evaluation-harness does it, and a corrected mode.

Faithful (lm-evaluation-harness@4e7e0d4, ``lm_eval/tasks/gsm8k/*.yaml``, ``lm_eval/filters/extraction.py``,
``exact_match_hf_evaluate``):

- ``strict-match``: the variant's regex, **first** match (``#### (\\-?[0-9\\.\\,]+)`` for ``gsm8k``;
  ``The answer is (\\-?[0-9\\.\\,]+).`` for the CoT variants, whose unescaped trailing ``.`` needs one more
  character: ``"The answer is 18"`` at the end of the text captures ``"1"``);
- ``flexible-extract``: ``(-?[$0-9.,]{2,})|(-?[0-9]+)``, the **last** match;
- a tuple match gives its first non-empty group; no match gives ``"[invalid]"``;
- ``exact_match``: ``re.sub`` of ``,``, ``\\$``, ``(?s).*#### ``, ``\\.$`` (in this order) on prediction and
  reference, lower-case, string equality. No numeric equivalence: ``"18.00" != "18"``.

Corrected (``mode="corrected"``): the lm-eval numbers are still reported, and beside them a ``numeric``
score in which the strict regexes are fixed (an optional ``$``, an optional trailing period, ``:`` after
"The answer is" as MetaMath/kpmath write it) and a prediction matches when it is the same number
(``float`` after removing ``,`` and ``$``; within 1e-9 relative).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

INVALID = "[invalid]"

STRICT = {
    "gsm8k": r"#### (\-?[0-9\.\,]+)",
    "gsm8k_chat": r"#### (\-?[0-9\.\,]+)",
    "gsm8k_cot": r"The answer is (\-?[0-9\.\,]+).",
    "gsm8k_cot_zeroshot": r"The answer is (\-?[0-9\.\,]+).",
    "kpmath_zeroshot": r"The answer is (\-?[0-9\.\,]+).",
}
STRICT_CORRECTED = {
    "gsm8k": r"#### \$?(\-?[0-9][0-9\.\,]*)",
    "gsm8k_chat": r"#### \$?(\-?[0-9][0-9\.\,]*)",
    "gsm8k_cot": r"The answer is:? \$?(\-?[0-9][0-9\.\,]*)",
    "gsm8k_cot_zeroshot": r"The answer is:? \$?(\-?[0-9][0-9\.\,]*)",
    "kpmath_zeroshot": r"The answer is:? \$?(\-?[0-9][0-9\.\,]*)",
}
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]  # lm-eval's regexes_to_ignore, applied in this order
VARIANTS = tuple(STRICT)


def regex_filter(response: str, pattern: str, group_select: int) -> str:
    """lm-eval's ``RegexFilter``: ``re.findall``, pick one match, first non-empty group of a tuple."""
    matches = re.findall(pattern, response)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), "")
    return match.strip()


def strict_match(response: str, variant: str, corrected: bool = False) -> str:
    table = STRICT_CORRECTED if corrected else STRICT
    if variant not in table:
        raise ValueError(f"unknown GSM8K variant {variant!r} (one of {', '.join(VARIANTS)})")
    return regex_filter(response, table[variant], 0)


def flexible_extract(response: str) -> str:
    return regex_filter(response, FLEXIBLE, -1)


def normalize(text: str) -> str:
    """lm-eval's ``exact_match`` preprocessing: the ignored regexes removed, then lower-cased."""
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def to_number(text: str) -> float | None:
    """The number a prediction or reference states (``,``/``$`` removed, a trailing period dropped)."""
    cleaned = text.split("#### ")[-1].replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def numeric_match(prediction: str, reference: str) -> bool:
    predicted, gold = to_number(prediction), to_number(reference)
    if predicted is None or gold is None:
        return False
    return math.isclose(predicted, gold, rel_tol=1e-9, abs_tol=1e-9)


def score_filters(
    response: str,
    variant: str,
    mode: str,
    names: tuple[str, str],
    faithful: Callable[[str], bool],
    corrected: Callable[[str], bool],
) -> dict[str, object]:
    """Both filters' answers and their verdicts: ``faithful`` judges lm-eval's extractions (reported as
    ``names[0]``); in corrected mode ``corrected`` also judges the fixed strict extraction and the flexible
    one (``names[1]``). GSM8K and GSM-hard differ only in their two judges."""
    if mode not in ("faithful", "corrected"):
        raise ValueError(f"mode must be 'faithful' or 'corrected', got {mode!r}")
    strict, flexible = strict_match(response, variant), flexible_extract(response)
    scored: dict[str, object] = {
        "strict-match": strict,
        "flexible-extract": flexible,
        f"{names[0]},strict-match": faithful(strict),
        f"{names[0]},flexible-extract": faithful(flexible),
    }
    if mode == "corrected":
        fixed = strict_match(response, variant, corrected=True)
        scored["strict-match-corrected"] = fixed
        scored[f"{names[1]},strict-match"] = corrected(fixed)
        scored[f"{names[1]},flexible-extract"] = corrected(flexible)
    return scored


def score(response: str, reference: str, variant: str, mode: str = "faithful") -> dict[str, object]:
    """One response against its reference: each filter's extracted answer and whether it is correct."""
    return score_filters(
        response,
        variant,
        mode,
        ("exact_match", "numeric"),
        lambda answer: exact_match(answer, reference),
        lambda answer: numeric_match(answer, reference),
    )


def aggregate(rows: list[dict]) -> dict[str, float | int]:
    """Mean of each boolean score, and how many answers each filter could not extract."""
    if not rows:
        return {"samples": 0}
    out: dict[str, float | int] = {"samples": len(rows)}
    for key in rows[0]:
        if isinstance(rows[0][key], bool):
            out[key] = sum(bool(r[key]) for r in rows) / len(rows)
        else:
            out[f"invalid,{key}"] = sum(r[key] == INVALID for r in rows)
    return out
