"""A GSM8K-format set about the made-up world: one-step word problems a tiny model can learn.

Each row is ``{"question", "answer"}`` as in openai/grade-school-math, the answer a worked step and the
final line ``#### N`` (no calculator annotations): "Mara has 3 kites. Mara gets 4 more. How many kites
does Mara have now?" -> "Mara has 3 + 4 = 7 kites now.\\n#### 7". Numbers are small (sums to
18, differences from 0), so the embedded ~1 M-parameter Llama can learn them by LoRA SFT: the pretrained
model knows the names and words but neither the format nor the sums, so ``fedalign eval gsm8k`` on a
``recipes/quickstart-gsm.yaml`` run shows the tuned model's accuracy above the base's.
"""

from __future__ import annotations

import random

from fedalign.embedded.world import World

THINGS = ("kites", "apples", "books", "coins", "hats", "shells", "cups", "stones")


def problem(rng: random.Random, name: str) -> dict[str, str]:
    thing = rng.choice(THINGS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        question = f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have now?"
        value, step = a + b, f"{a} + {b} = {a + b}"
    else:
        a, b = max(a, b), min(a, b)
        question = f"{name} has {a} {thing}. {name} gives {b} away. How many {thing} does {name} have now?"
        value, step = a - b, f"{a} - {b} = {a - b}"
    return {"question": question, "answer": f"{name} has {step} {thing} now.\n#### {value}"}


def arithmetic_sets(world: World, seed: int, train: int, test: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows); no held-out question is also a training question."""
    rng = random.Random(f"arithmetic-{seed}")
    names = list(world.people) + list(world.first_names)
    rows = [problem(rng, rng.choice(names)) for _ in range(train)]
    seen, held = {r["question"] for r in rows}, []
    while len(held) < test:
        row = problem(rng, rng.choice(names))
        if row["question"] not in seen:
            seen.add(row["question"])
            held.append(row)
    return rows, held
