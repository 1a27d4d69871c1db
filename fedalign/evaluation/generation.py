"""Batched greedy generation with a per-sample cache, shared by every benchmark.

Prompts are tokenized once, sorted by length and generated in batches with left padding (so every row's
new tokens start at the same column and the attention mask hides the padding); a response is cut at the
first stop sequence, as lm-evaluation-harness cuts it (``until``), and appended to the cache as soon as
its batch is done. The cache is keyed by everything that decides a response (checkpoint, prompt,
generation settings), so an interrupted evaluation continues where it stopped and a finished one reruns
from the cache without loading the model.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedalign.errors import ModelError

CACHE_FORMAT = 2  # 2: prompts longer than the context keep their last tokens (1 kept the first ones)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    batch_size: int = 8
    stop: tuple[str, ...] = ()
    do_sample: bool = False  # greedy unless a benchmark samples (SIUO: 3 samples per question)
    seed: int = 0
    temperature: float = 1.0  # only with do_sample
    add_special_tokens: bool = False  # lm-eval's HF backend encodes prompts without a BOS by default
    min_new_tokens: int = 0  # benchmarks only: equal decoding work whatever the model answers

    def key(self) -> str:
        """What decides a response. Not the batch size (batched = one at a time), so a smaller batch after
        running out of memory keeps the cache; the seed and temperature only when sampling; a format
        version, bumped when responses change."""
        ignored = ("batch_size",) + (() if self.do_sample else ("seed", "temperature"))
        decisive = {k: v for k, v in asdict(self).items() if k not in ignored}
        return json.dumps({**decisive, "format": CACHE_FORMAT}, sort_keys=True)


def read_keyed_jsonl(path: Path) -> list[dict]:
    """The ``{"key": ...}`` records of an append-only cache file (later lines win when read in order). A
    last line cut by a kill is dropped from the file, so the next append starts whole; unreadable lines
    are skipped."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    entries = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            entries.append(entry)
    return entries


@dataclass
class ResponseCache:
    """Append-only JSONL of ``{"key", "response"}``; later lines win."""

    path: Path
    entries: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for entry in read_keyed_jsonl(self.path):
            self.entries[entry["key"]] = str(entry.get("response", ""))

    def add(self, items: list[tuple[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)  # made with the first answer, not before
        with self.path.open("a") as handle:
            for key, response in items:
                handle.write(json.dumps({"key": key, "response": response}) + "\n")
                self.entries[key] = response


def sample_key(checkpoint_id: str, prompt: str, settings: GenerationSettings) -> str:
    material = json.dumps([checkpoint_id, prompt, settings.key()])
    return hashlib.sha256(material.encode()).hexdigest()


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


def context_limit(model, settings: GenerationSettings) -> int | None:
    """How many prompt tokens fit: the model's context less the new tokens (lm-eval's ``max_ctx_len``)."""
    length = getattr(model.config, "max_position_embeddings", None)
    if length is None:
        length = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    if length is None:
        return None
    if settings.max_new_tokens >= length:
        raise ModelError(
            f"max_new_tokens: {settings.max_new_tokens} leaves no room for a prompt in the model's "
            f"{length}-token context"
        )
    return length - settings.max_new_tokens


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: list[str],
    settings: GenerationSettings,
    images: list | None = None,
    samples: int = 1,
) -> list[str]:
    """Greedy (or, with ``settings.do_sample``, ``samples`` sampled) continuations of ``prompts`` (one
    padded batch), cut at the stop sequences; sampled ones come prompt by prompt, ``samples`` each.

    ``tokenizer`` is a tokenizer, or a vision-language model's processor with ``images`` (one PIL image per
    prompt, whose text holds the image placeholder, e.g. from the processor's chat template). A text
    prompt longer than the model's context less ``max_new_tokens`` keeps its last tokens, as lm-eval's HF
    backend does (never an image prompt: cutting it would cut the image's tokens).
    """
    device = next(model.parameters()).device
    text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    common = {"padding": True, "padding_side": "left", "return_tensors": "pt"}
    if images is not None:
        inputs = tokenizer(
            images=images, text=prompts, add_special_tokens=settings.add_special_tokens, **common
        )
    else:
        inputs = tokenizer(prompts, add_special_tokens=settings.add_special_tokens, **common)
        limit = context_limit(model, settings)
        if limit is not None and inputs["input_ids"].shape[1] > limit:
            # as lm-eval: keep the last tokens of the left-padded batch (a tokenizer's own truncation
            # cuts the end, where the question is: its ``truncation_side`` call argument is ignored)
            inputs = {k: v[:, -limit:] for k, v in inputs.items()}
    inputs = {k: v.to(device) for k, v in inputs.items()}
    extra = {"stop_strings": list(settings.stop), "tokenizer": text_tokenizer} if settings.stop else {}
    output = model.generate(
        **inputs,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        do_sample=settings.do_sample,
        pad_token_id=text_tokenizer.pad_token_id,
        **extra,
        **(
            {"temperature": settings.temperature, "num_return_sequences": samples}
            if settings.do_sample
            else {}
        ),
    )
    new = output[:, inputs["input_ids"].shape[1] :]
    texts = text_tokenizer.batch_decode(new, skip_special_tokens=True)
    return [cut_at_stops(t, settings.stop) for t in texts]


def generate_all(
    prompts: list[str],
    settings: GenerationSettings,
    cache: ResponseCache,
    checkpoint_id: str,
    load: Callable[[], tuple[object, object]],
    console: Console,
    label: str = "generating",
) -> tuple[list[str], dict[str, float]]:
    """Every prompt's response, from the cache or generated (longest prompts first); and what it took."""
    keys = [sample_key(checkpoint_id, p, settings) for p in prompts]
    todo = sorted({k: i for i, k in enumerate(keys) if k not in cache.entries}.values())
    stats = {"generated": float(len(todo)), "cached": float(len(prompts) - len(todo)), "seconds": 0.0}
    if todo:
        model, tokenizer = load()
        lengths = {i: len(tokenizer(prompts[i], add_special_tokens=False)["input_ids"]) for i in todo}
        limit = context_limit(model, settings)
        stats["truncated_prompts"] = float(sum(limit is not None and n > limit for n in lengths.values()))
        if stats["truncated_prompts"]:
            console.print(
                f"{label}: {stats['truncated_prompts']:.0f} prompts are longer than the model's context less "
                f"max_new_tokens ({limit} tokens) and keep their last {limit} tokens"
            )
        todo.sort(key=lambda i: -lengths[i])
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        started = time.perf_counter()
        with Progress(*columns, TextColumn("{task.fields[rate]}"), console=console) as progress:
            bar = progress.add_task(label, total=len(todo), rate="")
            for start in range(0, len(todo), settings.batch_size):
                batch = todo[start : start + settings.batch_size]
                responses = generate_batch(model, tokenizer, [prompts[i] for i in batch], settings)
                cache.add([(keys[i], r) for i, r in zip(batch, responses, strict=True)])
                done = start + len(batch)
                rate = done / max(time.perf_counter() - started, 1e-9)
                progress.update(bar, completed=done, rate=f"{rate:.2f} samples/s")
        stats["seconds"] = time.perf_counter() - started
        del model
    return [cache.entries[k] for k in keys], stats
