"""Load a base model once per process and attach the recipe's LoRA adapter to it.

Reachability is checked before anything heavy happens, so a hub id on an offline machine (or a typo in a
local path) stops the run at once with one line that says how to point the recipe at a local copy.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fedalign.errors import ModelError
from fedalign.hub import hub_unreachable_reason, looks_local
from fedalign.models.templates import resolve_chat_template
from fedalign.recipe import LoraSection, ModelSection

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: 'cuda' was asked for but no CUDA device is visible; use device=auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def check_model_reachable(section: ModelSection) -> None:
    """Raise a one-line :class:`ModelError` unless the model can be loaded from disk or the hub."""
    path = section.name_or_path
    if looks_local(path):
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelError(
                f"model.name_or_path: {path!r} is not a model folder (no config.json there); "
                "point it at a folder written by save_pretrained or at a hub id"
            )
        check_model_files(folder, path)
        if section.adapter is not None:
            check_adapter_files(section.adapter)
        return
    reason = hub_unreachable_reason(path, "model", section.revision)
    if reason is not None:
        local = "./models/" + path.split("/")[-1].lower()
        raise ModelError(
            f"model.name_or_path: {path!r} is not a local folder and cannot be fetched: {reason}. "
            f"Download it elsewhere (huggingface-cli download {path} --local-dir {local}), copy it here "
            f"and set model.name_or_path={local}"
        )


_JSON_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "generation_config.json", "processor_config.json", "preprocessor_config.json", "chat_template.json",
    "model.safetensors.index.json",
)  # fmt: skip
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model",
)  # fmt: skip


def check_model_files(folder: Path, shown: str) -> None:
    """The folder's weights and tokenizer are whole: a weight file exists (single or sharded), every
    safetensors header reads and its tensors fit in the file, the JSON configs parse and the chat template
    file is UTF-8. Reads headers only (milliseconds, whatever the model's size), so a truncated copy fails in
    one line before loading."""
    shards = sorted(folder.glob("*.safetensors"))
    if not shards and not any(
        (folder / n).is_file() for n in ("pytorch_model.bin", "model.safetensors.index.json")
    ):
        raise ModelError(
            f"model.name_or_path: {shown!r} has no weights (no *.safetensors or pytorch_model.bin)"
        )
    for shard in shards:
        check_safetensors(shard)
    for name in _JSON_FILES:
        _check_json(folder / name)
    template = folder / "chat_template.jinja"
    if template.is_file():
        raw = template.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as error:
            line = raw[: error.start].count(b"\n") + 1
            byte = raw[error.start]
            raise ModelError(f"{template}: line {line}: not UTF-8 text (byte {byte:#04x})") from None


def _check_json(file: Path, key: str = "") -> None:
    """``file``, if there, parses as JSON; a failure names it (``key: `` first when given)."""
    if file.is_file():
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise ModelError(
                f"{key}{file}: not valid JSON ({str(error)[:80]}); the copy may be truncated"
            ) from None


def check_safetensors(file: Path, key: str = "") -> None:
    """The safetensors header of ``file`` reads and its tensors fit in the file (reads the header only)."""
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if 8 + length > size:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise ModelError(f"{key}{file}: not a readable safetensors file (truncated or damaged)") from None
    if 8 + length + end > size:
        raise ModelError(f"{key}{file}: truncated ({size} bytes, its header promises {8 + length + end})")


def check_adapter_files(adapter: str, key: str = "model.adapter") -> Path:
    """The PEFT adapter folder ``adapter`` is whole: a parsable adapter_config.json and weights whose
    header reads. Checked before the base model loads, so a wrong path or a damaged copy fails first."""
    folder = Path(adapter).expanduser()
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise ModelError(
            f"{key}: {adapter!r} is not a PEFT adapter folder (no adapter_config.json there); "
            "point it at a run's adapter/ folder"
        )
    _check_json(config, f"{key}: ")
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        check_safetensors(weights, f"{key}: ")
    elif not (folder / "adapter_model.bin").is_file():
        raise ModelError(
            f"{key}: {adapter!r} has no adapter weights (no adapter_model.safetensors or adapter_model.bin)"
        )
    return folder


@dataclass
class LoadedModel:
    model: PeftModel
    tokenizer: object  # a transformers tokenizer, or a processor for a vision-language model
    device: torch.device
    vision: bool = False


def is_vision_language(section: ModelSection) -> bool:
    """Whether the model is a vision-language model (its config has a vision part), read from its config."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(section.name_or_path, revision=section.revision)
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelError(
            f"model.name_or_path: {section.name_or_path!r}: cannot read its config ({first})"
        ) from None
    return getattr(config, "vision_config", None) is not None


# What transformers raises for a tokenizer or processor it cannot build from the files it found.
_LOADING_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError)


def _tokenizer_error(section: ModelSection, error: Exception, what: str) -> ModelError:
    path = section.name_or_path
    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / n).is_file() for n in _TOKENIZER_FILES):
        return ModelError(
            f"model.name_or_path: {path!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
            "copy the model's tokenizer files into it"
        )
    first = (str(error).strip().splitlines() or [""])[0][:200]
    kind = type(error).__name__
    return ModelError(f"model.name_or_path: {path!r}: cannot load its {what} ({kind}: {first})")


def _own_template(section: ModelSection) -> str:
    """Where the model's own chat template comes from, for an error message."""
    file = Path(section.name_or_path).expanduser() / "chat_template.jinja"
    return str(file) if file.is_file() else f"the chat template of {section.name_or_path!r}"


def load_processor(section: ModelSection):
    """A vision-language model's processor (image processor + tokenizer), with a chat template and pad token.

    transformers 5 silently swaps the torchvision image processors for their PIL twins when torchvision is
    missing (stack-notes §2), which is what lets this run on machines without torchvision.
    """
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(section.name_or_path, revision=section.revision)
    except _LOADING_ERRORS as error:
        raise _tokenizer_error(section, error, "processor") from None
    processor.chat_template = resolve_chat_template(
        section.chat_template,
        processor.chat_template or processor.tokenizer.chat_template,
        _own_template(section),
    )
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def load_tokenizer(section: ModelSection):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(section.name_or_path, revision=section.revision)
    except _LOADING_ERRORS as error:
        raise _tokenizer_error(section, error, "tokenizer") from None
    tokenizer.chat_template = resolve_chat_template(
        section.chat_template, tokenizer.chat_template, _own_template(section)
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(section: ModelSection, device: torch.device, vision: bool = False):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    kwargs: dict[str, object] = {"revision": section.revision}
    if section.dtype != "auto":
        kwargs["dtype"] = _DTYPES[section.dtype]
    if section.attn_implementation is not None:
        kwargs["attn_implementation"] = section.attn_implementation
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = auto.from_pretrained(section.name_or_path, **kwargs)
    if section.adapter is not None:
        model = merge_adapter(model, section.adapter)
    return model.to(device)


def merge_adapter(base, adapter: str):
    """``base`` with the PEFT adapter at ``adapter`` merged into its weights (an SFT start for DPO).

    The merged model is what the new adapter trains on and, with adapters disabled, DPO's reference: the
    SFT policy, not the raw base. The adapter is read before anything else so a wrong path fails first.
    """
    folder = check_adapter_files(adapter)
    check_adapter_fits(base, folder, "model.adapter")
    try:
        return PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as error:
        raise ModelError(
            f"model.adapter: {adapter!r} does not fit model.name_or_path ({peft_detail(error)})"
        ) from None


def peft_detail(error: BaseException) -> str:
    """The informative line of a PEFT/torch loading error (a size mismatch names the tensor and both
    shapes; the first line of torch's message only says that loading failed)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    useful = [line for line in lines if "size mismatch" in line or "Missing key" in line]
    return (useful or lines or [type(error).__name__])[0][:300]


def _legacy_llava(module: str) -> str:
    """A module name as adapters saved with transformers < 4.52 spell LLaVA's (``language_model.model.``
    ...), in today's layout; PEFT converts these keys when it loads them."""
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head", "lm_head"),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ):
        if module.startswith(old):
            return new + module[len(old) :]
    return module


def check_adapter_fits(base, folder: Path, key: str) -> None:
    """Every module the adapter's weights adapt exists in ``base``. PEFT merges an adapter trained for
    another model silently (zero tensors matched, its warning filtered), and the run would go on as if
    no adapter had been given."""
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return  # a .bin adapter: PEFT's own loading checks it
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = list(handle.keys())
    except Exception as error:  # safetensors raises its own error type
        raise ModelError(f"{key}: {weights}: not a readable safetensors file ({str(error)[:100]})") from None
    adapted = set()
    for name in names:
        stem = name.removeprefix("base_model.model.")
        for part in (
            ".lora_A.",
            ".lora_B.",
            ".lora_embedding_A",
            ".lora_embedding_B",
            ".lora_magnitude_vector",
        ):
            if part in stem:
                adapted.add(stem.split(part)[0])
                break
    present = {n for n, _ in base.named_modules()}
    missing = sorted(m for m in adapted if m not in present and _legacy_llava(m) not in present)
    if missing:
        raise ModelError(
            f"{key}: {str(folder)!r} adapts {len(missing)} of its {len(adapted)} modules that this base "
            f"model does not have (first: {missing[0]!r}): it was trained for another model"
        )


def attach_lora(base, section: LoraSection, seed: int, vision: bool = False) -> PeftModel:
    """Wrap ``base`` with a LoRA adapter whose initial A is a function of ``seed`` alone.

    Every client, in this process or on another machine, derives the same initial adapter from the seed,
    which is what lets FFA-LoRA send only B. The global RNG is left as it was. For a vision-language model
    the placement comes from :func:`fedalign.models.vlm.lora_placement` and the vision tower is checked to
    be untouched.
    """
    from fedalign.models.vlm import check_vision_tower_untouched, lora_placement

    if vision:
        targets, full = lora_placement(base, section)
    elif section.projector is not None:
        raise ModelError("lora.projector: only for vision-language models (this model is text-only)")
    else:
        targets, full = section.target_modules, None
    config = LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=targets,
        modules_to_save=full,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = get_peft_model(base, config)
        except ValueError as error:
            first = str(error).splitlines()[0]
            raise ModelError(f"lora.target_modules: {first}") from None
    if vision:
        check_vision_tower_untouched(model)
    return model


def load_model(model: ModelSection, lora: LoraSection, seed: int, device: torch.device) -> LoadedModel:
    check_model_reachable(model)
    vision = is_vision_language(model)
    tokenizer = load_processor(model) if vision else load_tokenizer(model)
    base = load_base_model(model, device, vision)
    return LoadedModel(attach_lora(base, lora, seed, vision), tokenizer, device, vision)
