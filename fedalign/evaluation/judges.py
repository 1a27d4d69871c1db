"""Judges: one interface over an OpenAI-compatible endpoint, a local Hugging Face model and a replay cache.

A judge turns a :class:`JudgeRequest` (a rendered template, optional images) into a :class:`JudgeReply`:
the judge's text, or an ``error`` that says what went wrong. A transport failure (timeout, refused or
dropped connection, 5xx, rate limit after the last retry) is **never** turned into a verdict: the
benchmark's parser sees only replies with ``status == "ok"`` and everything else is counted as an error.
(align-anything's MM-SafetyBench judge returns ``"unsafe"`` on an HTTP failure, which inflates ASR.)

Every judge is wrapped in a :class:`CachedJudge`: an append-only JSONL keyed by everything that decides a
verdict (judge id, system, prompt, image digests, max_tokens, temperature, seed), so a rerun reads the
verdicts it already has, an interrupted run continues, and a ``replay:`` judge reproduces a finished run
offline. Errors are not cached: a rerun asks again.

The API key comes from the environment (``OPENAI_API_KEY``, or the variable ``judge.api_key_env`` names)
and is held only by the client object: it is not part of the judge id, the cache, a log or an output file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedalign.errors import FedalignError, RecipeError
from fedalign.evaluation.generation import read_keyed_jsonl

CACHE_FORMAT = 1


class JudgeError(FedalignError):
    """A judge that cannot be used at all (a replay cache without the verdict, a model that does not load)."""


@dataclass(frozen=True)
class JudgeRequest:
    prompt: str  # the fully rendered template
    images: tuple[bytes, ...] = ()  # encoded PNG/JPEG bytes
    system: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int | None = 0

    def key(self, judge_id: str) -> str:
        material = {
            "judge": judge_id,
            "system": self.system,
            "prompt": self.prompt,
            "images": [hashlib.sha256(image).hexdigest() for image in self.images],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "format": CACHE_FORMAT,
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class JudgeReply:
    text: str | None
    status: str  # "ok" or "error"
    error: str | None = None  # what failed (type and a short reason), for errors
    cached: bool = False
    model: str | None = None  # the model the server says answered (a dated version, for OpenAI)

    @classmethod
    def failed(cls, reason: str) -> JudgeReply:
        return cls(None, "error", reason[:300])


class Judge(Protocol):
    judge_id: str  # the backend and model: what a cached verdict is keyed by
    supports_images: bool

    def __call__(self, request: JudgeRequest) -> JudgeReply: ...

    def describe(self) -> dict[str, object]: ...


def _data_url(image: bytes) -> str:
    kind = "png" if image.startswith(b"\x89PNG") else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(image).decode()}"


OPENAI_URL = "https://api.openai.com/v1"


@dataclass
class OpenAIJudge:
    """A chat-completions endpoint through the ``openai`` client: OpenAI, or a local ``vllm serve`` /
    ``transformers serve``. Images travel as data URLs. The client's own retries are off; this judge
    retries timeouts, connection errors, 429 and 5xx ``max_retries`` times with exponential backoff, and
    then returns an ``error`` reply.

    The key: OpenAI itself (no ``base_url``) reads ``api_key_env`` (default ``OPENAI_API_KEY``); another
    server gets a key only when ``api_key_env`` is named explicitly, so an OpenAI key is never sent to a
    server the user did not mean to give it to. The URL is always explicit (``OPENAI_BASE_URL`` is not
    consulted), so the judge id names where verdicts came from."""

    model: str
    base_url: str | None = None
    api_key_env: str | None = None
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 1.0  # seconds before the first retry, doubled each time
    supports_images: bool = True
    _client: object = field(default=None, init=False, repr=False)
    _key: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        from openai import OpenAI

        variable = self.api_key_env or ("OPENAI_API_KEY" if self.base_url is None else None)
        key = os.environ.get(variable, "") if variable else ""
        if variable and not key:
            raise RecipeError(
                f"--judge openai:{self.model}: set {variable} in the environment (the key is read from there "
                "only, never from a file or the command line)"
            )
        self._key = key
        # A local server needs no key; the client insists on a non-empty one.
        self._client = OpenAI(
            api_key=key or "unused",
            base_url=self.base_url or OPENAI_URL,
            timeout=self.timeout,
            max_retries=0,
        )

    def _redact(self, text: str) -> str:
        """An error message without the key, or any key-like token a server echoed back."""
        if self._key:
            text = text.replace(self._key, "[key]")
        return re.sub(r"\b(sk|key)-[A-Za-z0-9_*\-.]{4,}", r"\1-[redacted]", text)

    @property
    def judge_id(self) -> str:
        return f"openai:{self.model}" + (f"@{self.base_url}" if self.base_url else "")

    def describe(self) -> dict[str, object]:
        return {
            "backend": "openai-compatible",
            "model": self.model,
            "base_url": self.base_url or OPENAI_URL,
            "timeout_s": self.timeout,
            "max_retries": self.max_retries,
        }

    def __call__(self, request: JudgeRequest) -> JudgeReply:
        import openai

        content: list[dict[str, object]] = [{"type": "text", "text": request.prompt}]
        content += [{"type": "image_url", "image_url": {"url": _data_url(i)}} for i in request.images]
        messages: list[dict[str, object]] = [{"role": "system", "content": request.system}] * bool(
            request.system
        )
        messages.append({"role": "user", "content": content if request.images else request.prompt})
        retryable = (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError)
        reason = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                completion = self._client.chat.completions.create(  # type: ignore[attr-defined]
                    model=self.model,
                    messages=messages,
                    max_tokens=request.max_tokens,
                    temperature=request.temperature,
                    **({"seed": request.seed} if request.seed is not None else {}),
                )
            except retryable as error:
                reason = self._redact(f"{type(error).__name__}: {_short(error)}")
                continue
            except openai.APIStatusError as error:
                reason = self._redact(f"HTTP {error.status_code}: {_short(error)}")
                if error.status_code >= 500:
                    continue
                return JudgeReply.failed(reason)  # a 4xx will not change on a retry
            except (openai.OpenAIError, ValueError) as error:  # an unreadable body
                return JudgeReply.failed(self._redact(f"{type(error).__name__}: {_short(error)}"))
            try:
                text = completion.choices[0].message.content
            except (AttributeError, IndexError, TypeError):
                return JudgeReply.failed("reply without choices[0].message.content")
            if not isinstance(text, str):
                return JudgeReply.failed("reply without text content")
            return JudgeReply(text, "ok", model=getattr(completion, "model", None))
        return JudgeReply.failed(f"{reason} (after {self.max_retries + 1} attempts)")


def _short(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


@dataclass
class HFJudge:
    """A local Hugging Face model (text or vision-language) as judge: its chat template, greedy decoding,
    ``local_files_only``. Runs one request at a time (the HTTP judges are the ones worth parallelising)."""

    path: str
    device: str = "auto"
    _loaded: tuple[object, object] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        from fedalign.models.loading import check_model_reachable, is_vision_language
        from fedalign.recipe import ModelSection

        self._section = ModelSection(name_or_path=self.path)
        check_model_reachable(self._section)
        self.supports_images = is_vision_language(self._section)

    @property
    def judge_id(self) -> str:
        """``hf:<folder name>#<digest>``: the digest covers the config and the weight files' names and sizes
        (not their bytes: hashing a 7B judge's weights on every run would cost minutes)."""
        folder = Path(self.path)
        if not folder.is_dir():
            return f"hf:{self.path}"
        digest = hashlib.sha256()
        for file in sorted(folder.iterdir()):
            if file.name.endswith((".json", ".jinja")):
                digest.update(file.name.encode() + file.read_bytes())
            elif file.suffix in (".safetensors", ".bin"):
                digest.update(f"{file.name}:{file.stat().st_size}".encode())
        return f"hf:{folder.name}#{digest.hexdigest()[:16]}"

    def describe(self) -> dict[str, object]:
        return {"backend": "hf-local", "model": self.path, "vision": self.supports_images}

    def _model(self):
        if self._loaded is None:
            from fedalign.models.loading import (
                load_base_model,
                load_processor,
                load_tokenizer,
                resolve_device,
            )

            vision = self.supports_images
            model = load_base_model(self._section, resolve_device(self.device), vision=vision).eval()
            self._loaded = (model, load_processor(self._section) if vision else load_tokenizer(self._section))
        return self._loaded

    def __call__(self, request: JudgeRequest) -> JudgeReply:
        import io

        from PIL import Image

        from fedalign.evaluation.generation import GenerationSettings, generate_batch

        with self._lock:
            model, processor = self._model()
            content: list[dict[str, str]] = (
                [{"type": "image"}] * len(request.images) if self.supports_images else []
            )
            content.append({"type": "text", "text": request.prompt})
            messages = [{"role": "system", "content": request.system}] * bool(request.system)
            messages.append({"role": "user", "content": content if self.supports_images else request.prompt})
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in request.images]
            settings = GenerationSettings(max_new_tokens=request.max_tokens, batch_size=1)
            try:
                reply = generate_batch(
                    model, processor, [text], settings, [images] if images and self.supports_images else None
                )
            except (RuntimeError, ValueError) as error:
                return JudgeReply.failed(f"{type(error).__name__}: {_short(error)}")
            return JudgeReply(reply[0], "ok")


class CachedJudge:
    """``inner`` behind an append-only JSONL of successful replies (see the module docstring)."""

    def __init__(self, inner: Judge | None, path: Path, judge_id: str | None = None) -> None:
        self.inner = inner
        self.path = path
        self.judge_id = judge_id or (inner.judge_id if inner is not None else "replay")
        self.supports_images = True if inner is None else inner.supports_images
        self._lock = threading.Lock()
        self.entries: dict[str, str] = {}
        self.models: dict[str, str | None] = {}
        for entry in read_keyed_jsonl(path):
            self.entries[entry["key"]] = str(entry.get("text", ""))
            self.models[entry["key"]] = entry.get("model")

    def describe(self) -> dict[str, object]:
        return (
            self.inner.describe()
            if self.inner is not None
            else {"backend": "replay", "cache": str(self.path)}
        )

    def __call__(self, request: JudgeRequest) -> JudgeReply:
        key = request.key(self.judge_id)
        if key in self.entries:
            return JudgeReply(self.entries[key], "ok", cached=True, model=self.models.get(key))
        if self.inner is None:
            raise JudgeError(
                f"replay judge: {self.path} has no verdict for a request (judge {self.judge_id}); "
                "replay only reproduces a run that used the same judge, templates and responses"
            )
        reply = self.inner(request)
        if reply.status == "ok":
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as handle:
                    record = {"key": key, "judge": self.judge_id, "model": reply.model, "text": reply.text}
                    handle.write(json.dumps(record) + "\n")
                self.entries[key] = reply.text or ""
                self.models[key] = reply.model
        return reply


def judge_all(
    requests: Sequence[JudgeRequest],
    judge: CachedJudge,
    concurrency: int,
    console: Console,
    label: str = "judging",
) -> list[JudgeReply]:
    """Every request's reply, in order: cached ones at once; each distinct uncached request asked once
    (identical answers to identical prompts share a verdict), ``concurrency`` at a time."""
    replies: list[JudgeReply | None] = [None] * len(requests)
    pending: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        key = request.key(judge.judge_id)
        if key in judge.entries:
            replies[index] = judge(request)
        else:
            pending.setdefault(key, []).append(index)
    if pending:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, TextColumn("{task.fields[errors]}"), console=console) as progress:
            bar = progress.add_task(label, total=len(pending), errors="")
            errors = 0

            def run(indices: list[int]) -> None:
                nonlocal errors
                reply = judge(requests[indices[0]])
                for index in indices:
                    replies[index] = reply
                errors += reply.status != "ok"
                progress.update(bar, advance=1, errors=f"{errors} errors" if errors else "")

            pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
            try:
                for future in [pool.submit(run, indices) for indices in pending.values()]:
                    future.result()  # re-raises a JudgeError (replay miss) in order
            except BaseException:  # Ctrl-C or a replay miss: drop the queue, wait only for requests in flight
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
    return [r for r in replies if r is not None]


KEYWORD = "keyword"


def make_judge(spec: str, cache: Path, settings: JudgeSettings) -> CachedJudge | None:
    """The judge ``--judge`` names, behind its cache; ``None`` for the keyword proxy.

    ``openai:MODEL`` (OpenAI, key from the environment), ``openai:MODEL@BASE_URL`` (any OpenAI-compatible
    server, e.g. ``vllm serve`` or ``transformers serve``), ``hf:PATH`` (a local model folder),
    ``replay:JUDGE_ID`` (the cache only: a verdict that is missing is an error), ``keyword``.
    """
    kind, _, rest = spec.partition(":")
    if spec == KEYWORD:
        return None
    if kind == "openai" and rest:
        model, _, base_url = rest.partition("@")
        if not model:
            raise RecipeError(f"--judge: {spec!r}: name the model, e.g. openai:gpt-4o")
        if base_url:
            from urllib.parse import urlsplit

            try:
                parts = urlsplit(base_url)
                valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
            except ValueError:
                valid = False
            if not valid:
                raise RecipeError(
                    f"--judge: {base_url!r} is not an http(s) URL, e.g. http://127.0.0.1:8000/v1"
                )
        judge: Judge = OpenAIJudge(
            model,
            base_url or None,
            settings.api_key_env,
            settings.timeout,
            settings.max_retries,
            settings.backoff,
            settings.images,
        )
    elif kind == "hf" and rest:
        judge = HFJudge(rest, settings.device)
    elif kind == "replay" and rest:
        return CachedJudge(None, cache, judge_id=rest)
    else:
        raise RecipeError(
            f"--judge: {spec!r} is not a judge; use openai:MODEL, openai:MODEL@URL, hf:PATH, replay:JUDGE_ID "
            "or keyword"
        )
    return CachedJudge(judge, cache)


@dataclass(frozen=True)
class JudgeSettings:
    concurrency: int = 4
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 1.0
    images: bool = True  # send the benchmark's images to an HTTP judge (SIUO, BeaverTails-V)
    api_key_env: str | None = None  # OpenAI itself: OPENAI_API_KEY; another server: no key unless named
    device: str = "auto"


def render(template: str, slots: dict[str, str]) -> str:
    """Fill ``{slot}`` markers by replacement, as the upstream scripts do: a response containing braces
    (code, JSON) would break ``str.format``, and SIUO's templates contain literal braces."""
    for name, value in slots.items():
        template = template.replace("{" + name + "}", value)
    return template


Parser = Callable[[str], str]
