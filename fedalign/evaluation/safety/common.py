"""What every safety benchmark shares: settings, samples, multimodal generation with a cache, judging,
output folders, and the words that say what a number is comparable to.

Pipeline (evaluators.md §1.1): ``generate → responses.jsonl → judge → judgments.jsonl → aggregate →
metrics.json``. ``responses.jsonl`` and ``judgments.jsonl`` sit in the benchmark's folder and are keyed
by everything that decides their content (checkpoint, prompt, image, decoding; judge, rendered template,
images), so an interrupted evaluation resumes without regenerating or re-judging anything finished and
two judges share one set of responses. Each judge and mode writes its own ``<judge>-<mode>/`` folder with
``metrics.json``, ``samples.jsonl`` and the plots.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedalign.errors import DataError, ModelError
from fedalign.evaluation.checkpoint import Checkpoint, is_run_dir
from fedalign.evaluation.generation import GenerationSettings, ResponseCache, generate_batch
from fedalign.evaluation.judges import (
    CachedJudge,
    JudgeReply,
    JudgeRequest,
    JudgeSettings,
    judge_all,
    make_judge,
)
from fedalign.evaluation.settings import parse_settings as parse_settings_into

REPO_DATA = Path(__file__).resolve().parents[3] / "data" / "safety"
"""The synthetic fixtures (``python -m fedalign.embedded``), the default data of every benchmark."""
FIXTURE_FOLDERS = {
    "mm-safetybench": "mm-safetybench",
    "siuo": "siuo",
    "beavertails-v": "beavertails-v",
    "spa-vl": "spa-vl",
    "benign": "benign",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataPaths(_Section):
    path: str | None = Field(default=None, description="the benchmark's data (single-benchmark commands)")
    mm_safetybench: str | None = None
    siuo: str | None = None
    beavertails_v: str | None = None
    spa_vl: str | None = None
    benign: str | None = None


class JudgeOptions(_Section):
    concurrency: int = Field(default=4, ge=1, le=256)
    timeout: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=3, ge=0, le=20)
    backoff: float = Field(default=1.0, ge=0)
    images: bool = Field(default=True, description="send the benchmark's images to the judge")
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="the environment variable holding the judge's key (OpenAI: OPENAI_API_KEY by default; "
        "another server gets a key only when this is set)",
    )
    device: str = "auto"


class SafetySettings(_Section):
    data: DataPaths = Field(default_factory=DataPaths)
    mode: Literal["faithful", "corrected"] = "corrected"
    limit: int | None = Field(default=None, ge=1, description="the first N samples of each benchmark")
    max_new_tokens: int = Field(default=512, ge=1)
    batch_size: int = Field(default=8, ge=1)
    device: str = "auto"
    seed: int = Field(default=0, ge=0)
    out: str | None = None
    judge: JudgeOptions = Field(default_factory=JudgeOptions)
    keywords: Literal["gcg", "smoothllm"] = "gcg"
    keywords_extra: list[Annotated[str, Field(min_length=2)]] = Field(
        default_factory=list, description="refusal phrases added to the keyword list (recorded in metrics)"
    )
    image_types: list[Literal["SD", "SD_TYPO", "TYPO", "text_only"]] = ["SD", "SD_TYPO", "TYPO"]
    scenarios: list[str] | None = None
    tiny: bool = Field(default=False, description="MM-SafetyBench's TinyVersion_ID_List.json subset")
    samples: int = Field(default=3, ge=1, le=16, description="SIUO: responses per question (upstream: 3)")
    temperature: float = Field(default=1.0, gt=0, description="SIUO's sampled responses")
    reference: str = Field(default="base", description="BeaverTails-V/SPA-VL reference: base, or a folder")
    sanity_check: bool = True

    def judge_settings(self) -> JudgeSettings:
        return JudgeSettings(**self.judge.model_dump())


@dataclass(frozen=True)
class Sample:
    """One prompt to answer: ``text`` (the user's turn) and an optional image (encoded bytes)."""

    sample_id: str
    subset: str  # scenario, category or split
    text: str
    image: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def data_root(settings: SafetySettings, benchmark: str, single: bool) -> tuple[Path, bool]:
    """The benchmark's data folder or file, and whether it is the bundled synthetic fixture."""
    key = benchmark.replace("-", "_")
    given = settings.data.path if single and settings.data.path else getattr(settings.data, key)
    if given is not None:
        path = Path(given).expanduser()
        if not path.exists():
            raise DataError(
                f"data.{'path' if single and settings.data.path else key}: {given!r} does not exist"
            )
        return path, False
    fixture = REPO_DATA / FIXTURE_FOLDERS[benchmark]
    if not fixture.exists():
        raise DataError(
            f"data.{'path' if single else key}: no {benchmark} data given, and the synthetic fixture "
            f"{fixture} is missing (a source checkout has it; `python -m fedalign.embedded` rebuilds it)"
        )
    return fixture, True


def checked_image(data: bytes, where: str) -> bytes:
    """``data`` if it is a readable image, else one line naming where it came from (before a model loads)."""
    from fedalign.data.images import verify_image

    try:
        verify_image(data)
    except ValueError as error:
        raise DataError(f"{where}: {error}") from None
    return data


def nonempty(samples: list, where: str) -> list:
    if not samples:
        raise DataError(f"{where}: no samples to evaluate")
    return samples


def image_digest(image: bytes | None) -> str:
    return "" if image is None else hashlib.sha256(image).hexdigest()


def _generation_key(checkpoint_id: str, sample: Sample, settings: GenerationSettings, index: int) -> str:
    material = json.dumps([checkpoint_id, sample.text, image_digest(sample.image), settings.key(), index])
    return hashlib.sha256(material.encode()).hexdigest()


def generate(
    samples: list[Sample],
    checkpoint: Checkpoint,
    settings: GenerationSettings,
    cache: ResponseCache,
    device: torch.device,
    console: Console,
    n: int = 1,
    label: str = "generating",
) -> list[list[str]]:
    """``n`` responses per sample (greedy: ``n`` = 1), from the cache or generated through the checkpoint's
    chat template (an image part first, then the text, as llava-hf's template puts ``<image>``)."""
    keys = [[_generation_key(checkpoint.id, s, settings, i) for i in range(n)] for s in samples]
    todo = [i for i, ks in enumerate(keys) if any(k not in cache.entries for k in ks)]
    if todo:
        vision = checkpoint.vision
        if not vision and any(samples[i].image is not None for i in todo):
            raise ModelError(
                f"{checkpoint.model.name_or_path}: a text-only model cannot answer image prompts; evaluate a "
                "vision-language model (or, for MM-SafetyBench, image_types=[text_only])"
            )
        model, processor = checkpoint.load(device)
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        started = time.perf_counter()
        with Progress(*columns, TextColumn("{task.fields[rate]}"), console=console) as progress:
            bar = progress.add_task(f"{label} ({checkpoint.label})", total=len(todo), rate="")
            # sampled answers are drawn one prompt at a time, seeded from the prompt's own key, so they do not
            # depend on the batch size or on which prompts an interrupted run had already answered
            step = 1 if settings.do_sample else settings.batch_size
            for start in range(0, len(todo), step):
                batch = todo[start : start + step]
                texts = [_chat_text(processor, samples[i], vision) for i in batch]
                images = [_image(samples[i]) for i in batch if vision and samples[i].image is not None]
                if images and len(images) != len(batch):  # mixed batches: one by one
                    outputs = []
                    for text, i in zip(texts, batch, strict=True):
                        one = [_image(samples[i])] if vision and samples[i].image is not None else None
                        outputs += _generate(model, processor, [text], settings, one, n, keys[i][0])
                else:
                    outputs = _generate(
                        model, processor, texts, settings, images or None, n, keys[batch[0]][0]
                    )
                cache.add([(keys[i][j], outputs[b * n + j]) for b, i in enumerate(batch) for j in range(n)])
                done = start + len(batch)
                rate = done / max(time.perf_counter() - started, 1e-9)
                progress.update(bar, completed=done, rate=f"{rate:.2f} samples/s")
        del model
    return [[cache.entries[k] for k in ks] for ks in keys]


def _chat_text(processor, sample: Sample, vision: bool) -> str:
    has_image = vision and sample.image is not None
    content = [{"type": "image"}] * has_image + [{"type": "text", "text": sample.text}]
    messages = [{"role": "user", "content": content if vision else sample.text}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _image(sample: Sample):
    from PIL import Image

    return Image.open(io.BytesIO(sample.image)).convert("RGB")  # type: ignore[arg-type]


def _generate(model, processor, texts, settings, images, n, first_key) -> list[str]:
    if settings.do_sample:  # one prompt per call: its draws depend on its key (and the seed) alone
        torch.manual_seed(int(first_key[:12], 16))
    outputs = generate_batch(model, processor, texts, settings, images, samples=n)
    return outputs if settings.do_sample or n == 1 else [o for o in outputs for _ in range(n)]


def judge_requests(
    requests: list[JudgeRequest], judge: CachedJudge, settings: SafetySettings, console: Console, label: str
) -> list[JudgeReply]:
    return judge_all(requests, judge, settings.judge.concurrency, console, label)


def build_judge(spec: str, folder: Path, settings: SafetySettings) -> CachedJudge | None:
    return make_judge(spec, folder / "judgments.jsonl", settings.judge_settings())


def judge_slug(spec: str) -> str:
    """A folder name for a judge: its kind and model, and a digest of the server URL when there is one (two
    servers serving the same model name are two judges)."""
    name, _, url = spec.partition("@")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-60:]
    return f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:6]}" if url else slug


def default_folder(target: str, adapter: str | None, benchmark: str, settings: SafetySettings) -> Path:
    if settings.out is not None:
        return Path(settings.out).expanduser() / benchmark
    path = Path(target).expanduser()
    if is_run_dir(path):
        return path / "eval" / benchmark
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", target.strip("/"))[-40:]
    which = hashlib.sha256(f"{Path(target).resolve()}|{adapter and Path(adapter).resolve()}".encode())
    return Path("evals") / f"{benchmark}-{slug}-{which.hexdigest()[:8]}"


PAPER_JUDGES = {
    "mm-safetybench": ("gpt-4", "GPT-4 (MM-SafetyBench's evaluation.py)"),
    "siuo": ("gpt-4-vision-preview", "gpt-4-vision-preview (SIUO's gpt-eval.py)"),
    "spa-vl": ("gpt-4-turbo", "gpt-4-turbo (align-anything's SPA-VL judge)"),
    "beavertails-v": (
        None,
        "unpublished: Safe RLHF-V's win-rate judge, prompts and reference are not public",
    ),
    "benign": (None, "none: a keyword over-refusal control"),
}


def comparability(benchmark: str, judge: CachedJudge | None, fixture: bool, settings: SafetySettings) -> str:
    """In words: what the numbers may be compared with. Only the paper's judge model on OpenAI's own
    endpoint comes close; anything else (another model, a local server, the keyword proxy) does not."""
    parts = []
    if fixture:
        parts.append(
            "synthetic fixture data (data/safety): these numbers check the pipeline and the demo model only"
        )
    model, described = PAPER_JUDGES[benchmark]
    if judge is None:
        parts.append(
            f"keyword proxy ({settings.keywords} list{_extra(settings)}): a lower bound on refusal, never an "
            "attack success rate or a win rate; not comparable to any published number"
        )
    elif model is not None and judge.judge_id.removeprefix("replay:") == f"openai:{model}":
        parts.append(
            f"judge {judge.judge_id}, the paper's ({described}); API models change under one name, so "
            "compare the protocol, not the digits"
        )
    else:
        parts.append(
            f"judge {judge.judge_id} is not the paper's ({described}): not comparable to published numbers"
        )
    parts.append(f"mode {settings.mode}")
    return "; ".join(parts)


def _extra(settings: SafetySettings) -> str:
    return f" + {len(settings.keywords_extra)} extra phrases" if settings.keywords_extra else ""


def judge_record(judge: CachedJudge | None, replies: list[JudgeReply], settings: SafetySettings) -> dict:
    """What the metrics say about the judge: id, backend, the models its server reported, error count."""
    if judge is None:
        from evaluators.refusal.keywords import classifier

        return {
            "id": "keyword",
            "backend": "refusal keywords (proxy)",
            **classifier(settings.keywords, settings.keywords_extra).describe(),
        }
    errors = [r.error for r in replies if r.status != "ok"]
    return {
        "id": judge.judge_id,
        **judge.describe(),
        "reported_models": sorted({r.model for r in replies if r.model}),
        "requests": len(replies),
        "cached": sum(r.cached for r in replies),
        "errors": len(errors),
        "first_errors": sorted(set(e for e in errors if e))[:3],
        "images_sent": settings.judge.images and judge.supports_images,
        "concurrency": settings.judge.concurrency,
    }


def versions() -> dict[str, str]:
    found = {}
    for name in ("fedalign", "torch", "transformers", "peft", "openai"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def finite(value: Any) -> Any:
    """JSON without NaN: a rate with an empty denominator is ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def write_results(folder: Path, metrics: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """``metrics.json`` and ``samples.jsonl``, each written whole to a temporary name and then renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)),
        ("metrics.json", json.dumps(finite(metrics), indent=1, ensure_ascii=False)),
    ):
        temporary = folder / f".{name}.tmp"
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(folder / name)


def proxy_names(metrics: dict[str, Any]) -> dict[str, Any]:
    """Keyword-proxy metrics renamed so that no key reads as a judge's: ``asr`` → ``asr_kw``,
    ``asr_micro`` → ``asr_micro_kw``, ``refusal_rate`` → ``refusal_rate_kw``."""
    renamed = {}
    for key, value in metrics.items():
        proxy = (key.startswith("asr") or key == "refusal_rate") and not key.endswith("_kw")
        renamed[f"{key}_kw" if proxy else key] = proxy_names(value) if isinstance(value, dict) else value
    return renamed


def parse_settings(overrides: list[str]) -> SafetySettings:
    """``key=value`` pairs into validated :class:`SafetySettings` (one line per problem)."""
    return parse_settings_into(overrides, SafetySettings)
