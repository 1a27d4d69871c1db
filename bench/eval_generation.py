"""fedalign's batched generation against a one-sample-at-a-time ``generate`` loop, same model and prompts.

The embedded tiny Llama (256-token context), lm-eval's zero-shot CoT GSM8K prompts for the test fixture's
questions (repeated to ``--samples``), greedy, every response exactly 32 tokens (``min_new_tokens``: the
tiny model would end most at once, and a real model's chain of thought is decode-bound),
lm-eval's stop sequences, 32 new tokens. Batched: :func:`fedalign.evaluation.generation.generate_batch`
over length-sorted batches of ``--batch-size``; single: the same function on one prompt at a time (what a
plain ``for prompt in prompts: model.generate(...)`` loop does). Both produce identical responses (checked
here too). Alternates the two sides ``--repeats`` times and prints the ratio of medians last.

    python bench/eval_generation.py [--samples 48] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from evaluators.gsm8k import task  # noqa: E402
from fedalign.evaluation.generation import GenerationSettings, generate_batch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variant", default="gsm8k_cot_zeroshot", help="the tiny model's context is 256 tokens"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(REPO / "data" / "tiny-llama").eval()
    lines = (REPO / "tests" / "fixtures" / "gsm8k" / "train.jsonl").read_text().splitlines()
    docs = ([json.loads(x) for x in lines] * args.samples)[: args.samples]  # the 20 fixture lines, repeated
    prompts = task.prompts(docs, args.variant)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    settings = GenerationSettings(
        max_new_tokens=32,
        min_new_tokens=32,
        batch_size=args.batch_size,
        stop=tuple(task.stop_sequences(args.variant)),
    )

    def batched() -> list[str]:
        out: dict[int, str] = {}
        for start in range(0, len(order), args.batch_size):
            chunk = order[start : start + args.batch_size]
            out.update(
                zip(
                    chunk,
                    generate_batch(model, tokenizer, [prompts[i] for i in chunk], settings),
                    strict=True,
                )
            )
        return [out[i] for i in range(len(prompts))]

    def single() -> list[str]:
        return [generate_batch(model, tokenizer, [p], settings)[0] for p in prompts]

    assert batched() == single(), "batched and one-at-a-time responses differ"
    fast, slow = [], []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        batched()
        fast.append(time.perf_counter() - started)
        started = time.perf_counter()
        single()
        slow.append(time.perf_counter() - started)
        print(
            f"repeat {repeat + 1}: batched {fast[-1]:.2f} s, one at a time {slow[-1]:.2f} s, "
            f"{slow[-1] / fast[-1]:.2f}x"
        )
    b, s = statistics.median(fast), statistics.median(slow)
    print(
        f"{len(prompts)} GSM8K {args.variant} prompts, 32 new tokens: batched {b:.2f} s "
        f"({len(prompts) / b:.1f} samples/s), one at a time {s:.2f} s ({len(prompts) / s:.1f} samples/s): "
        f"{s / b:.2f}x"
    )


if __name__ == "__main__":
    main()
