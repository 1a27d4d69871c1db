"""Recipe validation: good files load, bad ones are refused before any model is loaded, naming the key."""

from pathlib import Path

import pytest
import yaml

from fedalign.errors import RecipeError
from fedalign.recipe import load_recipe, validate_recipe

from .conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.federation.clients_per_round <= recipe.federation.num_clients


def test_paper_recipes_have_the_paper_setup() -> None:
    dolly = load_recipe(REPO / "recipes" / "dolly.yaml")
    assert dolly.model.name_or_path.endswith("Llama-2-7b-hf")
    assert (dolly.federation.num_clients, dolly.federation.clients_per_round) == (10, 2)
    assert dolly.federation.local_steps == 10
    assert dolly.lora.target_modules == ["q_proj", "v_proj"]
    metamath = load_recipe(REPO / "recipes" / "metamath.yaml")
    assert metamath.model.name_or_path.endswith("Llama-2-13b-hf")
    assert metamath.data.source == "metamathqa"
    assert load_recipe(REPO / "recipes" / "gsm8k.yaml").data.source == "gsm8k"
    spavl = load_recipe(REPO / "recipes" / "spavl.yaml")  # FedASK's multimodal DPO setup
    assert spavl.model.name_or_path == "llava-hf/llava-1.5-7b-hf" and spavl.data.source == "spavl"
    assert (spavl.federation.num_clients, spavl.federation.clients_per_round) == (10, 2)
    assert (spavl.federation.rounds, spavl.federation.local_steps) == (600, 10)
    assert (spavl.lora.r, spavl.lora.projector, spavl.partition.kind) == (256, "lora", "iid")
    assert (spavl.train.batch_size, spavl.train.learning_rate) == (2, 1e-5)
    private = load_recipe(REPO / "recipes" / "spavl.yaml", ["privacy.unit=pair", "privacy.target_epsilon=6"])
    assert private.privacy.unit == "pair" and private.privacy.target_epsilon == 6


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_overrides_are_applied_and_typed(tmp_path: Path, base_recipe: dict) -> None:
    path = _write(tmp_path, base_recipe)
    recipe = load_recipe(path, ["federation.rounds=50", "lora.r=32", "lora.target_modules=[q_proj]"])
    assert recipe.federation.rounds == 50
    assert recipe.lora.r == 32
    assert recipe.lora.target_modules == ["q_proj"]
    assert load_recipe(path, ["algorithm.name=ffa"]).algorithm.name == "ffa"


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("federation.clients_per_round=5", "federation.clients_per_round", "<= num_clients"),
        ("lora.r=0", "lora.r", "greater than 0"),
        ("lora.alpha=0", "lora.alpha", "greater than 0"),
        ("lora.alpha=-1", "lora.alpha", "greater than 0"),
        ("lora.alpha=.inf", "lora.alpha", "finite"),
        ("lora.rank=4", "lora.rank", "unknown key"),
        ("federation.rounds=many", "federation.rounds", "integer"),
        ("partition.kind=random", "partition.kind", "'iid' or 'dirichlet'"),
        ("algorithm.name=nope", "algorithm", "'fedavg'"),
        ("train.learning_rate=-1", "train.learning_rate", "greater than 0"),
        ("privacy.noise_multiplier=0", "privacy.noise_multiplier", "greater than 0"),
        ("privacy.clip_norm=-0.5", "privacy.clip_norm", "greater than 0"),
        ("privacy.delta=1", "privacy.delta", "less than 1"),
        ("privacy.unit=everyone", "privacy.unit", "'client'"),
    ],
)
def test_bad_values_name_the_key(
    tmp_path: Path, base_recipe: dict, override: str, key: str, words: str
) -> None:
    path = _write(tmp_path, base_recipe)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, [override])
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}: ")
    assert words in message
    assert len(message.splitlines()) == 1


def test_missing_section_and_bad_files(tmp_path: Path, base_recipe: dict) -> None:
    del base_recipe["lora"]
    with pytest.raises(RecipeError, match=r"lora: required key is missing"):
        validate_recipe(base_recipe, "x.yaml")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping of sections"):
        load_recipe(listed)


def test_privacy_needs_a_budget_or_a_noise_level_and_a_small_delta(tmp_path: Path, base_recipe: dict) -> None:
    path = _write(tmp_path, base_recipe)
    with pytest.raises(
        RecipeError, match=r"privacy: unit 'client' needs target_epsilon .* or noise_multiplier"
    ):
        load_recipe(path, ["privacy.unit=client"])
    with pytest.raises(RecipeError, match=r"privacy\.delta: must be < 1/num_clients"):
        load_recipe(path, ["privacy.unit=client", "privacy.target_epsilon=3", "privacy.delta=0.5"])
    with pytest.raises(RecipeError, match=r"privacy\.sampling: .*Poisson"):
        load_recipe(path, ["privacy.unit=example", "privacy.target_epsilon=3", "privacy.sampling=shuffle"])
    with pytest.raises(RecipeError, match=r"train\.gradient_accumulation_steps: must be 1"):
        load_recipe(
            path, ["privacy.unit=example", "privacy.target_epsilon=3", "train.gradient_accumulation_steps=2"]
        )
    recipe = load_recipe(path, ["privacy.unit=client", "privacy.noise_multiplier=1.1"])
    assert recipe.privacy.enabled and recipe.privacy.noise_multiplier == 1.1


def test_override_into_a_value_is_refused(tmp_path: Path, base_recipe: dict) -> None:
    path = _write(tmp_path, base_recipe)
    with pytest.raises(RecipeError, match=r"lora\.r is a value, not a section"):
        load_recipe(path, ["lora.r.x=1"])
    with pytest.raises(RecipeError, match=r"expected dotted\.key=value"):
        load_recipe(path, ["lora.r"])


def test_resolved_yaml_round_trips(base_recipe: dict) -> None:
    recipe = validate_recipe(base_recipe)
    again = validate_recipe(yaml.safe_load(recipe.resolved_yaml()))
    assert again == recipe
