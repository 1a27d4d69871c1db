"""Shared fixtures. Tests run offline: nothing may come from a model hub."""

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "data" / "tiny-llama"
QUICKSTART_DATA = REPO / "data" / "quickstart" / "dolly.jsonl"


@pytest.fixture
def base_recipe(tmp_path: Path) -> dict:
    """A small valid recipe (as a raw dict) on the embedded tiny model and data."""
    return small_recipe(tmp_path)


def small_recipe(tmp_path: Path) -> dict:
    """The raw dict behind :func:`base_recipe`, for fixtures of a wider scope."""
    return {
        "name": "test",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(TINY_MODEL)},
        "data": {"source": "dolly", "path": str(QUICKSTART_DATA), "max_rows": 120, "holdout": 20},
        "federation": {"num_clients": 3, "clients_per_round": 2, "rounds": 2, "local_steps": 2},
        "lora": {"r": 4, "alpha": 8},
        "train": {"batch_size": 4, "learning_rate": 0.005, "max_length": 96},
        "eval": {"batch_size": 10},
    }
