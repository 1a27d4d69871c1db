"""Typed recipes: the YAML a user writes, validated in full before any model or data is touched.

``load_recipe("recipes/dolly.yaml", ["federation.rounds=50", "lora.r=32"])`` reads the file, applies dotted
overrides (values parsed as YAML, so ``true``, ``1e-4`` and ``[q_proj,v_proj]`` work), and validates. Every
problem is reported as ``<file>: <dotted.key>: <what is wrong>``; unknown keys are errors, not ignored.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedalign.algorithms import registry
from fedalign.errors import RecipeError


class Section(BaseModel):
    """A recipe section: unknown keys, infinite or NaN numbers and ``true``/``false`` where a number belongs
    are errors (YAML's ``rounds: true`` would otherwise be 1, ``.inf`` a learning rate)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation in (int, float) or str(annotation) in ("int | None", "float | None"):
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
"""The loss types TRL 1.16's DPOTrainer computes (it checks only at the first loss, after a run started)."""


class ModelSection(Section):
    """The base model: a local folder or a hub id (``meta-llama/Llama-2-7b-hf``)."""

    name_or_path: str
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None
    chat_template: str | None = Field(
        default=None,
        description="None: the tokenizer's own template, or the built-in 'alpaca' one when it has none; "
        "'alpaca' or 'chatml' to force a built-in one; or a path to a .jinja file.",
    )
    adapter: str | None = Field(
        default=None,
        description="a PEFT adapter folder (e.g. an SFT run's adapter/) merged into the base before "
        "training; for DPO the merged model is then also the reference",
    )


class DataSection(Section):
    source: Literal["dolly", "metamathqa", "gsm8k", "local", "spavl", "preference"] = Field(
        description="SFT: dolly, metamathqa, gsm8k, local (prompt/completion columns); "
        "DPO: spavl (image, question, chosen, rejected) or preference (prompt, chosen, rejected, "
        "optional image)"
    )
    path: str = Field(
        description="a local .jsonl/.json/.parquet file (or folder of them) or a hub dataset id"
    )
    config: str | None = Field(default=None, description="the hub dataset's configuration, e.g. 'main'")
    split: str = "train"
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="field -> column name; for 'local' at least prompt and completion "
        "(optional: context, label, system)",
    )
    label_column: str | None = Field(
        default=None, description="the column Dirichlet partitions over; defaults to the source's own"
    )
    system_prompt: str | None = None
    max_rows: int | None = Field(default=None, gt=0)
    holdout: float = Field(
        default=0.05, ge=0, description="rows held out for evaluation: a fraction (< 1) or a count (>= 1)"
    )
    eval_path: str | None = Field(default=None, description="a separate evaluation file instead of a holdout")
    eval_split: str = "test"
    image_root: str | None = Field(
        default=None, description="folder that relative image paths are read from; default: the data file's"
    )
    on_bad_row: Literal["stop", "skip"] = Field(
        default="stop",
        description="a row with a missing field or an unreadable image stops the run (naming it), or with "
        "'skip' is left out, counted and listed in partition.json",
    )


class PartitionSection(Section):
    kind: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(default=0.5, gt=0)
    min_rows_per_client: int = Field(default=1, ge=1)


class FederationSection(Section):
    num_clients: int = Field(ge=1)
    clients_per_round: int = Field(ge=1)
    rounds: int = Field(ge=1)
    local_steps: int = Field(ge=1, description="optimizer steps per client visit")
    weighting: Literal["examples", "uniform"] = "examples"
    min_clients: int = Field(
        default=1, ge=1, description="fewer surviving clients than this fail the round (no update)"
    )
    max_failed_rounds: int = Field(default=3, ge=1, description="failed rounds in a row that stop the run")
    client_timeout_s: float | None = Field(
        default=None, gt=0, description="a client visit longer than this is dropped from its round"
    )

    @field_validator("min_clients")
    @classmethod
    def _at_most_a_cohort(cls, value: int, info: ValidationInfo) -> int:
        cohort = info.data.get("clients_per_round")
        if cohort is not None and value > cohort:
            raise ValueError(f"must be <= clients_per_round ({value} > {cohort})")
        return value

    @field_validator("clients_per_round")
    @classmethod
    def _at_most_all_clients(cls, value: int, info: ValidationInfo) -> int:
        total = info.data.get("num_clients")
        if total is not None and value > total:
            raise ValueError(f"must be <= num_clients ({value} > {total})")
        return value


class FaultsSection(Section):
    """Seeded fault injection (fedalign/runtime/faults.py): per sampled client and round, the chance that it
    never answers (drop), raises (crash), returns NaN (nan), answers ``slow_s`` late (slow) or fails after
    its first upload (late: between FedASK's two stages)."""

    drop: float = Field(default=0.0, ge=0, le=1)
    crash: float = Field(default=0.0, ge=0, le=1)
    nan: float = Field(default=0.0, ge=0, le=1)
    slow: float = Field(default=0.0, ge=0, le=1)
    late: float = Field(default=0.0, ge=0, le=1)
    slow_s: float = Field(default=0.0, ge=0)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _a_probability(self) -> FaultsSection:
        if self.drop + self.crash + self.nan + self.slow + self.late > 1:
            raise ValueError("faults: drop + crash + nan + slow + late must be at most 1")
        return self


class LoraSection(Section):
    r: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="module names (for a vision-language model: the language model's modules only) or a "
        "PEFT regex string",
    )
    projector: Literal["lora", "full", "frozen"] | None = Field(
        default=None,
        description="vision-language models only (default 'lora'): LoRA on the multimodal projector's "
        "linear layers, train it fully (it then travels as full tensors), or leave it frozen",
    )

    @field_validator("alpha")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value


class TrainSection(Section):
    batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=5e-4, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0, description="0 disables clipping")
    max_length: int = Field(default=512, ge=8)
    optim: str = "adamw_torch"

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        from transformers.training_args import OptimizerNames

        names = [o.value for o in OptimizerNames]
        if value not in names:
            raise ValueError(f"{value!r} is not a transformers optimizer (e.g. {', '.join(names[:4])}, sgd)")
        return value

    optimizer_state: Literal["fresh", "persist"] = Field(
        default="fresh",
        description="fresh optimizer per client visit, or each client's own state kept on disk",
    )
    gradient_checkpointing: bool = False


class PrivacySection(Section):
    """Which unit is protected and how much (see :mod:`fedalign.privacy.accounting`).

    ``example`` (SFT) and ``pair`` (DPO) are DP-SGD inside each client's local steps; ``client`` is
    DP-FedAvg: each client's update is clipped and the server adds Gaussian noise to their sum.
    """

    unit: Literal["none", "example", "pair", "client"] = "none"
    target_epsilon: float | None = Field(
        default=None,
        gt=0,
        description="the budget: σ is calibrated to it, or, with noise_multiplier, it is a cap",
    )
    noise_multiplier: float | None = Field(default=None, gt=0, description="σ, when not calibrated")
    delta: float = Field(default=1e-5, gt=0, lt=1)
    clip_norm: float = Field(default=1.0, gt=0)
    accountant: Literal["pld", "prv", "rdp"] = Field(
        default="pld",
        description="pld: dp-accounting's PLD (tightest, the default); prv: Opacus PRV; rdp: Opacus RDP",
    )
    sampling: Literal["poisson", "shuffle"] = Field(
        default="poisson",
        description="client-level cohorts: Poisson at rate k/N, or exactly k without replacement "
        "(accounted under replace-one neighbours, rdp accountant only)",
    )
    randomness: Literal["secret", "seeded"] = Field(
        default="secret",
        description="secret: DP noise and sampling keyed by OS entropy kept in the run's private/ folder; "
        "seeded: derived from the public seed (reproducible, and then ε is no guarantee against anyone "
        "holding the seed)",
    )

    @model_validator(mode="after")
    def _one_of(self) -> PrivacySection:
        if self.unit != "none" and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(f"unit {self.unit!r} needs target_epsilon (σ is calibrated) or noise_multiplier")
        if self.unit == "client" and self.sampling == "shuffle" and self.accountant != "rdp":
            raise ValueError(
                "sampling 'shuffle' (fixed-size cohorts without replacement) is accounted soundly only by "
                "accountant 'rdp' (replace-one neighbours); set accountant: rdp, or sampling: poisson"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.unit != "none"


class DPOSection(Section):
    """TRL ``DPOConfig`` settings that change the objective (``fedalign dpo`` only)."""

    beta: float = Field(default=0.1, gt=0)
    loss_type: str | list[str] = Field(default="sigmoid", description="TRL DPOConfig.loss_type")

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, value: str | list[str]) -> str | list[str]:
        for loss in [value] if isinstance(value, str) else value:
            if loss not in DPO_LOSS_TYPES:
                raise ValueError(f"{loss!r} is not one of TRL's DPO losses: {', '.join(DPO_LOSS_TYPES)}")
        return value

    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)


class EvalSection(Section):
    batch_size: int = Field(default=8, ge=1)
    every: int = Field(default=0, ge=0, description="held-out loss every N rounds; 0: only before and after")
    preferred_pattern: str | None = Field(
        default=None,
        description="DPO: a regex a greedy answer to a held-out prompt matches when it shows the preferred "
        "behaviour; its rate is reported before and after training",
    )
    max_new_tokens: int = Field(default=32, ge=1)
    generations: int | None = Field(
        default=None, ge=1, description="held-out prompts to generate for (default: all of them)"
    )

    @field_validator("preferred_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"not a valid regular expression ({error})") from None
        return value


class CheckpointSection(Section):
    every: int = Field(default=1, ge=1)
    keep_last: int | None = Field(default=None, ge=1, description="None keeps every round's checkpoint")


def _algorithm_union() -> Any:
    configs = tuple(cls.config_class for cls in registry().values())
    return Annotated[Union[configs], Field(discriminator="name")]  # noqa: UP007 (a runtime tuple)


class Recipe(Section):
    name: str = Field(description="the run directory's stem: letters, digits, '.', '_', '-'")
    seed: int = Field(default=42, ge=0, lt=2**32)
    output_dir: str = "runs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelSection
    data: DataSection
    partition: PartitionSection = Field(default_factory=PartitionSection)
    federation: FederationSection
    lora: LoraSection
    algorithm: _algorithm_union() = Field(default_factory=lambda: {"name": "fedavg"}, validate_default=True)  # type: ignore[valid-type]
    train: TrainSection = Field(default_factory=TrainSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    faults: FaultsSection = Field(default_factory=FaultsSection)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
            raise ValueError(
                f"{value!r}: use letters, digits, '.', '_' and '-' (it names a folder inside output_dir)"
            )
        return value

    @model_validator(mode="after")
    def _example_level_dp_needs(self) -> Recipe:
        unit = self.privacy.unit
        if unit in ("example", "pair") and self.privacy.sampling != "poisson":
            raise ValueError(
                "privacy.sampling: DP-SGD here is accounted for Poisson sampling only; use 'poisson'"
            )
        if unit in ("example", "pair") and self.train.gradient_accumulation_steps != 1:
            raise ValueError(f"train.gradient_accumulation_steps: must be 1 under privacy.unit {unit!r}")
        return self

    @model_validator(mode="after")
    def _no_timing_channel_under_dp(self) -> Recipe:
        if self.privacy.enabled and self.federation.client_timeout_s is not None:
            raise ValueError(
                "federation.client_timeout_s: not under privacy: a visit's time follows its secret "
                "batches, so dropping late clients would publish it"
            )
        return self

    @model_validator(mode="after")
    def _delta_below_one_over_units(self) -> Recipe:
        if self.privacy.unit == "client" and self.privacy.delta >= 1 / self.federation.num_clients:
            raise ValueError(
                f"privacy.delta: must be < 1/num_clients = {1 / self.federation.num_clients:.3g} "
                f"for client-level privacy (got {self.privacy.delta})"
            )
        return self

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently, so a
    pasted second ``rounds:`` would quietly win over the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merge keys (<<) may repeat a key on purpose; other keys are checked by PyYAML
            key = self.construct_object(key_node)
            if key in seen:
                problem = f"key {key!r} given twice (first on line {seen[key] + 1})"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: builds plain values only


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in a nested dict, parsing the value as YAML."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {override!r}: expected dotted.key=value")
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise RecipeError(f"override {override!r}: {where} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = _yaml(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise RecipeError(
            f"override {override!r}: the value is not valid YAML ({getattr(error, 'problem', 'unparsable')})"
        ) from None


def _format_error(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-"))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif item["type"] not in ("value_error", "union_tag_invalid") and not isinstance(
            item.get("input"), dict | type(None)
        ):
            message = f"{message} (got {item['input']!r})"
        lines.append(f"{source}: {loc}: {message}" if loc else f"{source}: {message}")
    return "\n".join(lines)


def validate_recipe(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        raise RecipeError(_format_error(source, error)) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = _yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}: line {line}: not UTF-8 text (byte {error.object[error.start]:#04x})"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}:{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if raw is None:
        raise RecipeError(f"{path}: the recipe is empty (it needs name, model, data, federation and lora)")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    return validate_recipe(raw, str(path))
