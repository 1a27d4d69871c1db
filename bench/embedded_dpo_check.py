"""Does DPO measurably move the embedded models? A check with TRL's DPOTrainer directly, before and after.

The federated DPO quickstart shows two numbers on held-out preference pairs: the reward accuracy (the
fraction of pairs whose implicit reward β·log(π/π_ref) is higher for the chosen answer; 0 at the start,
where the policy is the reference) and the rate at which greedy answers show the preferred behaviour
(``fedalign.embedded.PREFERRED_PATTERN``, a refusal at the start of the answer). This script measures
both before and after LoRA DPO with ``trl.DPOTrainer`` (no fedalign runtime involved) on the embedded data:
the tiny LLaVA on ``data/quickstart-dpo/spavl.parquet`` by default, or a text model on ``text.jsonl`` with
``--text``. By default it simulates the quickstart's federation (FedAvg-LoRA: 20 rounds, 2 of 10 clients
a round, 10 local steps of batch 4 each with a fresh optimizer, a Dirichlet split over ``category``);
``--rounds 0 --steps N`` trains one LoRA for N steps instead. It prints steps/s and both metrics (with
``--json``, every greedy answer too).

    OMP_NUM_THREADS=1 python bench/embedded_dpo_check.py                          # LLaVA, quickstart-like
    OMP_NUM_THREADS=1 python bench/embedded_dpo_check.py --rounds 0 --steps 200   # one run of 200 steps
    OMP_NUM_THREADS=1 python bench/embedded_dpo_check.py --text                   # text DPO, tiny Llama

Measured (1 thread, 2026-11): LLaVA, federated 400 steps in about 52 s, reward accuracy 0.00 -> 1.00,
preferred rate 0.02 -> 0.95. Text DPO on the tiny Llama (pretrained, never instruction-tuned): reward
accuracy 0.00 -> 1.00 but preferred rate 0.00 -> 0.00, as ``fedalign/embedded/instruct.py`` explains.
"""

from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from harness import CPU_TRAINER_ARGS  # noqa: E402
from peft import (  # noqa: E402
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from fedalign.data.partition import partition_dirichlet, partition_iid  # noqa: E402
from fedalign.embedded import PREFERRED_PATTERN, is_preferred  # noqa: E402
from fedalign.models.tiny_llava import LLAVA_LORA_TARGETS  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"


def load_rows(text: bool, data: Path) -> list[dict[str, Any]]:
    """The preference rows in TRL's conversational format (structured content and a PIL image for LLaVA),
    each with its ``category`` (popped before training)."""
    if text:
        rows = [
            json.loads(line) for line in (data / "quickstart-dpo" / "text.jsonl").read_text().splitlines()
        ]
        return [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
                "category": r["category"],
            }
            for r in rows
        ]
    table = pq.read_table(data / "quickstart-dpo" / "spavl.parquet").to_pylist()
    return [
        {
            "image": Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB"),
            "prompt": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}
            ],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r["chosen"]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r["rejected"]}]}],
            "category": r["category"],
        }
        for r in table
    ]


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the completion tokens' log-probabilities for each row of a DPO collator batch ([chosen; rejected])."""  # noqa: E501
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    token_logps = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(1)


@torch.no_grad()
def reward_accuracy(
    model: PeftModel, collator: Any, rows: list[dict[str, Any]], batch_size: int = 16
) -> float:
    """Fraction of pairs with log π(c) − log π_ref(c) > log π(r) − log π_ref(r) (β > 0 does not change it).

    The reference is the base model (adapters disabled), which is what DPO's reference is for a fresh LoRA.
    """
    model.eval()
    wins = 0
    for start in range(0, len(rows), batch_size):
        chunk = [dict(r) for r in rows[start : start + batch_size]]  # the collator pops keys
        batch = collator(chunk)
        policy = sequence_logps(model, batch)
        with model.disable_adapter():
            ref = sequence_logps(model, batch)
        chosen, rejected = (policy - ref).chunk(2)
        wins += int((chosen > rejected).sum())
    return wins / len(rows)


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    processor: Any,
    rows: list[dict[str, Any]],
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers to the held-out prompts (chat template + generation prompt, left-padded batches)."""
    model.eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        texts = [
            processor.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
            for r in chunk
        ]
        if "image" in chunk[0]:
            inputs = processor(
                images=[r["image"] for r in chunk],
                text=texts,
                padding=True,
                add_special_tokens=False,
                return_tensors="pt",
            )
        else:
            inputs = processor(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    tokenizer.padding_side = side
    return answers


def measure(
    model: PeftModel, trainer: DPOTrainer, processor: Any, held_out: list[dict[str, Any]], max_new_tokens: int
) -> dict[str, Any]:
    start = time.perf_counter()
    accuracy = reward_accuracy(model, trainer.data_collator, list(trainer.eval_dataset))
    answers = greedy_answers(model, processor, held_out, max_new_tokens)
    rate = sum(map(is_preferred, answers)) / len(answers)
    return {
        "reward_accuracy": accuracy,
        "preferred_rate": rate,
        "examples": answers[:3],
        "answers": answers,
        "seconds": time.perf_counter() - start,
    }


def federate(
    trainer: DPOTrainer,
    model: PeftModel,
    processor: Any,
    train: list[dict[str, Any]],
    labels: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """FedAvg-LoRA as the quickstart runs it: ``--clients`` clients (a Dirichlet split over ``category``, or
    IID), ``--per-round`` sampled per round, each ``--local-steps`` steps from the global adapter with a
    fresh optimizer, then the A and B factors averaged with weights proportional to the clients' rows."""
    ids = list(range(len(train)))
    if args.dirichlet > 0:
        partition = partition_dirichlet(ids, labels, args.clients, args.dirichlet, args.seed)
    else:
        partition = partition_iid(ids, args.clients, args.seed)
    shards = []
    for client in partition.clients:
        shard = Dataset.from_list([train[i] for i in client])
        if args.text:  # the trainer tokenizes text rows once, as it did the whole train set
            shard = trainer._prepare_dataset(shard, processor, trainer.args, "train")
        shards.append(shard)
    global_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    sampler = random.Random(args.seed)
    losses = []
    for _ in range(args.rounds):
        total, weighted = 0, {k: torch.zeros_like(v) for k, v in global_state.items()}
        for client in sampler.sample(range(args.clients), args.per_round):
            set_peft_model_state_dict(model, global_state)
            trainer.train_dataset = shards[client]
            trainer.optimizer, trainer.lr_scheduler = None, None  # a fresh optimizer per visit
            losses.append(trainer.train().training_loss)
            rows = len(shards[client])
            for k, v in get_peft_model_state_dict(model).items():
                weighted[k] += rows * v.detach()
            total += rows
        global_state = {k: v / total for k, v in weighted.items()}
    set_peft_model_state_dict(model, global_state)
    return {"partition_sizes": partition.sizes(), "visit_losses": [round(x, 4) for x in losses]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", action="store_true", help="text DPO on --text-model and text.jsonl")
    parser.add_argument("--text-model", default="tiny-llama", help="a causal LM folder under --data")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (one run, not federated)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=60, help="rows held out for the evaluation")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20, help="FedAvg rounds; 0: one run of --steps")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--dirichlet", type=float, default=0.5, help="Dirichlet alpha over category; 0: IID")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the full report (every answer) as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")

    if args.text:
        processor = AutoTokenizer.from_pretrained(args.data / args.text_model)
        base = AutoModelForCausalLM.from_pretrained(args.data / args.text_model)
        targets: str | list[str] = ["q_proj", "v_proj"]
    else:
        processor = AutoProcessor.from_pretrained(args.data / "tiny-llava")
        base = AutoModelForImageTextToText.from_pretrained(args.data / "tiny-llava")
        targets = LLAVA_LORA_TARGETS
    rows = load_rows(args.text, args.data)
    random.Random(args.seed).shuffle(rows)
    held_out, train = rows[: args.held_out], rows[args.held_out :]
    labels = [row.pop("category") for row in train]
    for row in held_out:
        row.pop("category")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = get_peft_model(base, LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets))
    steps = args.local_steps if args.rounds else args.steps
    config = DPOConfig(
        output_dir=str(Path(tempfile.gettempdir()) / "fedalign-embedded-dpo-check"),  # nothing saved
        max_steps=steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        beta=args.beta,
        max_length=None,
        **CPU_TRAINER_ARGS,
        remove_unused_columns=False,
        logging_steps=max(1, steps // 10),
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=config,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(held_out),  # tokenized by the trainer (text) as its collator expects
        processing_class=processor,
    )
    trainer.remove_callback(PrinterCallback)  # the per-step log goes into the report instead
    before = measure(model, trainer, processor, held_out, args.max_new_tokens)
    start = time.perf_counter()
    if args.rounds:
        federation = federate(trainer, model, processor, train, labels, args)
        total_steps = args.rounds * args.per_round * args.local_steps
        log: Any = federation
    else:
        trainer.train()
        total_steps = args.steps
        keys = ("step", "loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
        log = [
            {k: round(v, 3) for k, v in h.items() if k in keys}
            for h in trainer.state.log_history
            if "loss" in h
        ]
    seconds = time.perf_counter() - start
    after = measure(model, trainer, processor, held_out, args.max_new_tokens)
    report = {
        "model": f"{args.text_model} (text)" if args.text else "tiny-llava",
        "pattern": PREFERRED_PATTERN,
        "train_rows": len(train),
        "held_out": len(held_out),
        "mode": f"fedavg {args.rounds}x{args.per_round}x{args.local_steps}" if args.rounds else "one run",
        "steps": total_steps,
        "batch": args.batch,
        "lr": args.lr,
        "beta": args.beta,
        "r": args.r,
        "alpha": args.alpha,
        "train_seconds": round(seconds, 1),
        "steps_per_second": round(total_steps / seconds, 2),
        "before": before,
        "after": after,
        "log": log,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(
        f"{report['model']}, {report['mode']}: {total_steps} steps of batch {args.batch} in {seconds:.1f} s "
        f"({report['steps_per_second']} steps/s); lr {args.lr}, beta {args.beta}, LoRA r {args.r}/alpha "
        f"{args.alpha}; {len(held_out)} held-out pairs"
    )
    for name, m in (("before", before), ("after", after)):
        print(
            f"  {name:6s} reward accuracy {m['reward_accuracy']:.2f}, preferred rate {m['preferred_rate']:.2f} "  # noqa: E501
            f"({m['seconds']:.1f} s to measure); e.g. {m['examples'][0]!r}"
        )


if __name__ == "__main__":
    main()
