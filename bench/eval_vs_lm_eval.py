"""fedalign's batched generation against lm-evaluation-harness's HF backend: same model, prompts, decoding.

The embedded tiny Llama, lm-eval's zero-shot CoT GSM8K prompt (``Q: ...\\nA: Let's think step by step.``)
on the test fixture's 20 questions repeated to ``--samples``, greedy, lm-eval's stop sequences, exactly 32
new tokens on both sides (``min_new_tokens``, so the work is equal and decode-bound), batch 16, float32 on
the CPU. lm-eval runs as a local task YAML over a local JSONL through ``lm_eval.simple_evaluate`` (its own
prompt building, batching and stop handling); fedalign runs :func:`generate_batch` on the prompts its
``evaluators/gsm8k`` builds. The responses of the two are compared, then each side is timed ``--repeats``
times, alternating; the ratio of medians is printed last. Needs ``pip install lm-eval`` (not a dependency).

    python bench/eval_vs_lm_eval.py [--samples 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from evaluators.gsm8k import task  # noqa: E402
from fedalign.evaluation.generation import GenerationSettings, generate_batch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "data" / "tiny-llama"
NEW_TOKENS, BATCH = 32, 16

TASK_YAML = """task: fedalign_bench_gsm8k
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA: Let's think step by step."
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: ["Q:", "</s>", "<|im_end|>"]
  do_sample: false
  max_gen_toks: {tokens}
  min_new_tokens: {tokens}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
num_fewshot: 0
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(2)
    lines = (REPO / "tests" / "fixtures" / "gsm8k" / "train.jsonl").read_text().splitlines()
    docs = ([json.loads(x) for x in lines] * args.samples)[: args.samples]
    root = Path(tempfile.mkdtemp(prefix="fedalign-lmeval-"))
    data = root / "test.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "bench.yaml").write_text(TASK_YAML.format(data=data, tokens=NEW_TOKENS))
    manager = TaskManager(include_path=str(root))

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH, device="cpu", max_length=256)
    prompts = task.prompts(docs, "gsm8k_cot_zeroshot")
    stop = tuple(task.stop_sequences("gsm8k_cot_zeroshot"))
    settings = GenerationSettings(NEW_TOKENS, BATCH, stop, min_new_tokens=NEW_TOKENS)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))

    def ours() -> list[str]:
        out: dict[int, str] = {}
        for start in range(0, len(order), BATCH):
            chunk = order[start : start + BATCH]
            texts = generate_batch(model, tokenizer, [prompts[i] for i in chunk], settings)
            out.update(zip(chunk, texts, strict=True))
        return [out[i] for i in range(len(prompts))]

    def theirs() -> list[str]:
        results = lm_eval.simple_evaluate(
            model=harness, tasks=["fedalign_bench_gsm8k"], task_manager=manager, log_samples=True
        )
        samples = sorted(results["samples"]["fedalign_bench_gsm8k"], key=lambda s: s["doc_id"])
        return [s["resps"][0][0] for s in samples]

    same = sum(a == b for a, b in zip(ours(), theirs(), strict=True))
    print(f"identical responses: {same} of {len(prompts)}")
    fast, slow = [], []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        ours()
        fast.append(time.perf_counter() - started)
        started = time.perf_counter()
        theirs()
        slow.append(time.perf_counter() - started)
        print(f"repeat {repeat + 1}: fedalign {fast[-1]:.2f} s, lm-eval {slow[-1]:.2f} s")
    a, b = statistics.median(fast), statistics.median(slow)
    print(
        f"{len(prompts)} prompts, {NEW_TOKENS} new tokens: fedalign {a:.2f} s, lm-eval HF {b:.2f} s: "
        f"lm-eval / fedalign = {b / a:.2f}x"
    )


if __name__ == "__main__":
    main()
