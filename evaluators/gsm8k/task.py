"""GSM8K prompts, stop sequences and references, from ``bench.yaml`` (the lm-evaluation-harness formats).

``prompts(docs, variant, train_docs)`` builds every prompt in document order: the 5-shot ``gsm8k``
variant draws its shots as lm-eval's sampler does (one ``random.Random(1234)`` advanced document by
document, ``sample(train, 5)``), so the same documents in the same order get the same shots; the 8-shot
``gsm8k_cot`` uses Wei et al.'s exemplars, first eight (a 2,141-character prefix, sha256 3d55795c…).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent / "bench.yaml"


@lru_cache(maxsize=1)
def spec() -> dict[str, Any]:
    return yaml.safe_load(BENCH.read_text())


def variant_spec(variant: str) -> dict[str, Any]:
    variants = spec()["variants"]
    if variant not in variants:
        raise ValueError(f"unknown GSM8K variant {variant!r} (one of {', '.join(variants)})")
    return variants[variant]


def number_of(answer: str) -> str:
    """The gold number of a GSM8K ``answer`` (lm-eval's ``answer.split('####')[-1].strip()``)."""
    return answer.split("####")[-1].strip()


def reference(doc: Mapping[str, Any], variant: str) -> str:
    """What lm-eval compares against: the whole answer (``gsm8k``) or its number (the CoT variants)."""
    answer = str(doc["answer"])
    return answer if variant_spec(variant)["target"] == "answer" else number_of(answer)


def _shot(doc: Mapping[str, Any], variant: str) -> str:
    chosen = variant_spec(variant)
    target = doc["target"] if "target" in doc else reference(doc, variant)
    return chosen["doc_to_text"].format(question=doc["question"]) + chosen["target_delimiter"] + target


def prompts(
    docs: Sequence[Mapping[str, Any]],
    variant: str,
    train_docs: Sequence[Mapping[str, Any]] = (),
    shots: int | None = None,
) -> list[str]:
    """The prompt of every document, in order; ``shots`` fewer than the variant's own, if given."""
    chosen = variant_spec(variant)
    most, kind = chosen.get("num_fewshot", 0), chosen.get("fewshot")
    if shots is not None and not 0 <= shots <= most:
        raise ValueError(f"variant {variant!r} takes 0 to {most} shots, got {shots}")
    shots = most if shots is None else shots
    if kind == "random_train" and len(train_docs) < shots:
        raise ValueError(
            f"variant {variant!r} needs {shots} training rows for its shots, got {len(train_docs)}"
        )
    rnd = random.Random(chosen.get("fewshot_seed", 1234))
    out = []
    for doc in docs:
        if kind == "exemplars":
            examples = spec()["exemplars"][:shots]
        elif kind == "random_train":
            examples = rnd.sample(list(train_docs), shots)
        else:
            examples = []
        context = "".join(_shot(e, variant) + chosen["fewshot_delimiter"] for e in examples)
        out.append(context + chosen["doc_to_text"].format(question=doc["question"]))
    return out


def stop_sequences(variant: str) -> list[str]:
    return list(variant_spec(variant)["until"])


def template_hash(variant: str) -> str:
    """sha256 of everything that shapes a prompt of this variant (template, shots, delimiters)."""
    chosen = variant_spec(variant)
    material = yaml.safe_dump({"variant": chosen, "exemplars": spec()["exemplars"]}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()
