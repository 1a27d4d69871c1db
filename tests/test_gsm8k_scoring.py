"""GSM8K / GSM-hard scoring as lm-evaluation-harness scores it (evaluators.md §2), faithful and corrected.

Expected values are lm-eval's documented behaviour, quirks included: the CoT strict regex's unescaped
trailing ``.`` makes "The answer is 18" at the end of the text (or before a newline) extract "1"; a ``$``
defeats the strict regex; "18.00" is not "18".
"""

import json
from pathlib import Path

import pytest

import evaluators
from evaluators.gsm8k import task
from evaluators.gsm8k.extraction import INVALID, flexible_extract, score, strict_match

FIXTURES = Path(__file__).parent / "fixtures" / "gsm8k"

# (variant, response, reference, strict, flexible, strict correct, flexible correct, corrected-strict numeric)
CASES = [
    ("gsm8k_cot", "So 6 + 12 = 18. The answer is 18.", "18", "18", "18.", True, True, True),
    ("gsm8k_cot", "The answer is 18", "18", "1", "18", False, True, True),
    ("gsm8k_cot", "The answer is 18\n", "18", "1", "18", False, True, True),
    ("gsm8k_cot", "The answer is $18.", "18", INVALID, "$18.", False, True, True),
    ("gsm8k_cot", "The answer is 1,000.", "1000", "1,000", "1,000.", True, True, True),
    ("gsm8k_cot", "It drops by 3. The answer is -3.", "-3", "-3", "-3.", True, True, True),
    ("gsm8k_cot", "The answer is 18.00.", "18", "18.00", "18.00.", False, False, True),
    ("gsm8k_cot", "The answer is 0.5.", "0.5", "0.5", "0.5.", True, True, True),
    ("gsm8k_cot", "I think 5 apples and 7 pears, so 12", "12", INVALID, "12", False, True, False),
    ("gsm8k_cot", "The answer is 5. Then 6 more. The answer is 11.", "11", "5.", "11.", False, True, False),
    ("gsm8k_cot", "no number here", "18", INVALID, INVALID, False, False, False),
    ("gsm8k_cot", "so #### 18", "18", INVALID, "18", False, True, False),
    ("gsm8k_cot_zeroshot", "The answer is: 7.", "7", INVALID, "7.", False, True, True),
    ("kpmath_zeroshot", "4 * 2 = 8\nThe answer is: 8", "8", INVALID, "8", False, True, True),
    ("gsm8k", " 48/2 = <<48/2=24>>24 in May.\n#### 72", "She sold...\n#### 72", "72", "72", True, True, True),
    ("gsm8k", " 2 + 2 = 4\n#### $1,004.", "x\n#### 1004", INVALID, "$1,004.", False, True, True),
    ("gsm8k", " The answer is 72.", "x\n#### 72", INVALID, "72.", False, True, False),
]


@pytest.mark.parametrize(
    ("variant", "response", "reference", "strict", "flexible", "strict_ok", "flexible_ok", "numeric_ok"),
    CASES,
)
def test_extraction_and_match_follow_lm_eval(
    variant, response, reference, strict, flexible, strict_ok, flexible_ok, numeric_ok
) -> None:
    assert strict_match(response, variant) == strict
    assert flexible_extract(response) == flexible
    faithful = score(response, reference, variant, "faithful")
    assert faithful["exact_match,strict-match"] is strict_ok
    assert faithful["exact_match,flexible-extract"] is flexible_ok
    assert "numeric,strict-match" not in faithful
    corrected = score(response, reference, variant, "corrected")
    assert {k: corrected[k] for k in faithful} == faithful  # lm-eval's numbers stay as they are
    assert corrected["numeric,strict-match"] is numeric_ok


def _fixture(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def test_real_gsm8k_solutions_score_as_correct_in_every_variant() -> None:
    docs = _fixture("train.jsonl")
    gsm8k = evaluators.load("gsm8k")
    answers = [d["answer"] for d in docs]
    full = gsm8k.compute(predictions=[" " + a for a in answers], references=answers, variant="gsm8k")
    assert full["exact_match,strict-match"] == 1.0 and full["samples"] == len(docs)
    cot = [a.split("####")[0] + f"The answer is {task.number_of(a)}." for a in answers]
    refs = [task.reference(d, "gsm8k_cot") for d in docs]
    scored = gsm8k.compute(predictions=cot, references=refs, variant="gsm8k_cot", mode="corrected")
    assert scored["exact_match,strict-match"] == 1.0 and scored["numeric,strict-match"] == 1.0
    assert scored["invalid,strict-match"] == 0
    wrong = gsm8k.compute(predictions=["The answer is 0."] * len(docs), references=refs, variant="gsm8k_cot")
    assert wrong["exact_match,strict-match"] == pytest.approx(sum(r == "0" for r in refs) / len(refs))


def test_the_8_shot_cot_prompt_is_lm_evals() -> None:
    import hashlib

    prompt = task.prompts([{"question": "How many?"}], "gsm8k_cot")[0]
    prefix = prompt.removesuffix("Q: How many?\nA:")
    assert len(prefix) == 2141 and hashlib.sha256(prefix.encode()).hexdigest().startswith("3d55795c084e26f6")
    assert task.stop_sequences("gsm8k_cot") == ["Q:", "</s>", "<|im_end|>"]


def test_the_5_shot_prompt_draws_its_shots_like_lm_evals_sampler() -> None:
    train, docs = _fixture("train.jsonl"), [{"question": "A?"}, {"question": "B?"}]
    first = task.prompts(docs, "gsm8k", train)
    assert first == task.prompts(docs, "gsm8k", train)  # seeded: same documents, same shots
    assert first[0].count("Question: ") == 6 and first[0].endswith("Question: A?\nAnswer:")
    assert first[0].split("Question: A?")[0] != first[1].split("Question: B?")[0]  # the sampler advances


def test_gsm_hard_uses_pal_tolerance_and_keeps_float_targets() -> None:
    gsmhard = evaluators.load("gsmhard")
    responses = ["The answer is 14053029.666666666.", "The answer is -9867630.", "The answer is 2.5.", "none"]
    targets = [14053029.666666666, -9867630.0, 2.502, 3.0]
    faithful = gsmhard.compute(predictions=responses, references=targets)
    assert faithful["accuracy,strict-match"] == pytest.approx(0.5)  # 2.5 vs 2.502 is outside 1e-3
    assert faithful["invalid,strict-match"] == 1
    big = gsmhard.compute(
        predictions=["The answer is 9280000000000.1."], references=[9280000000000.0], mode="corrected"
    )
    assert big["accuracy,strict-match"] == 0.0 and big["relative,strict-match"] == 1.0


def test_unknown_variants_and_modes_fail_in_one_clear_line() -> None:
    with pytest.raises(ValueError, match="unknown GSM8K variant 'cot'"):
        strict_match("The answer is 1.", "cot")
    with pytest.raises(ValueError, match="mode must be"):
        score("x", "1", "gsm8k", "lenient")
    with pytest.raises(KeyError, match="unknown benchmark 'gsm9k'"):
        evaluators.path("gsm9k")
