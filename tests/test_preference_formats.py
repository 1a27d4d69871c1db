"""Preference data in TRL's conversational formats, as hub datasets publish it: message lists with an
explicit prompt (trl-lib/ultrafeedback_binarized), whole conversations with an implicit prompt (Anthropic
HH), and the vision format (structured content with an image placeholder and an ``images`` list column,
e.g. HuggingFaceH4/rlaif-v_formatted), each loaded and then trained on by a real federated DPO run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest
import torch
from rich.console import Console

from fedalign.data.preferences import load_preferences
from fedalign.errors import DataError
from fedalign.recipe import validate_recipe
from fedalign.runtime.dpo import run_dpo

from .conftest import TINY_MODEL
from .dpo_data import dpo_recipe, pair_rows, png, save_tiny_llava

torch.set_num_threads(1)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def explicit_rows(n: int) -> list[dict]:
    """ultrafeedback_binarized's shape: prompt, chosen and rejected as message lists."""
    return [
        {
            "prompt": [{"role": "system", "content": "Be careful."}, user(r["question"])],
            "chosen": [assistant(r["chosen"])],
            "rejected": [assistant(r["rejected"])],
            "category": r["category"],
        }
        for r in pair_rows(n)
    ]


def implicit_rows(n: int) -> list[dict]:
    """Anthropic HH's shape: no prompt column; two whole conversations that differ in the last answer."""
    rows = []
    for r in pair_rows(n):
        history = [user("Hello."), assistant("Hello, how can I help?"), user(r["question"])]
        rows.append(
            {
                "chosen": [*history, assistant(r["chosen"])],
                "rejected": [*history, assistant(r["rejected"])],
                "category": r["category"],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_trl_vision_parquet(path: Path, n: int, images_per_row: int = 1) -> Path:
    """The TRL vision preference format, written by `datasets` as a hub parquet shard would be."""
    rows = pair_rows(n)
    text = lambda s: [{"type": "text", "text": s}]  # noqa: E731
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "prompt": [{"role": datasets.Value("string"), "content": [
                {"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
            "chosen": [{"role": datasets.Value("string"), "content": [
                {"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
            "rejected": [{"role": datasets.Value("string"), "content": [
                {"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        }
    )  # fmt: skip
    table = {
        "images": [[{"bytes": png(r["category"]), "path": None}] * images_per_row for r in rows],
        "prompt": [
            [{"role": "user", "content": [{"type": "image", "text": None}, *text(r["question"])]}]
            for r in rows
        ],
        "chosen": [[{"role": "assistant", "content": text(r["chosen"])}] for r in rows],
        "rejected": [[{"role": "assistant", "content": text(r["rejected"])}] for r in rows],
    }
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    return path


def section(path: Path, **extra):
    raw = dpo_recipe(str(TINY_MODEL), path, Path("unused"), source="preference")
    raw["data"].update(extra)
    return validate_recipe(raw).data


def test_explicit_message_lists_are_read_as_they_are(tmp_path) -> None:
    loaded = load_preferences(section(write_jsonl(tmp_path / "p.jsonl", explicit_rows(4))), vision=False)
    first = loaded.examples[0]
    row = pair_rows(1)[0]
    assert first.prompt == [{"role": "system", "content": "Be careful."}, user(row["question"])]
    assert first.chosen == [assistant(row["chosen"])] and first.rejected == [assistant(row["rejected"])]
    # A recipe system prompt does not stack on a row that has its own system turn.
    again = load_preferences(
        section(tmp_path / "p.jsonl", system_prompt="Recipe system."), vision=False
    ).examples[0]
    assert again.prompt == first.prompt


def test_implicit_prompt_is_the_shared_history(tmp_path) -> None:
    loaded = load_preferences(section(write_jsonl(tmp_path / "p.jsonl", implicit_rows(4))), vision=False)
    first, row = loaded.examples[0], pair_rows(1)[0]
    assert first.prompt == [user("Hello."), assistant("Hello, how can I help?"), user(row["question"])]
    assert first.chosen == [assistant(row["chosen"])] and first.rejected == [assistant(row["rejected"])]


def test_trl_vision_format_keeps_the_image_lazy_and_flattens_the_placeholder(tmp_path) -> None:
    path = write_trl_vision_parquet(tmp_path / "v.parquet", 4)
    loaded = load_preferences(section(path), vision=True)
    first = loaded.examples[0]
    assert first.prompt == [user(pair_rows(1)[0]["question"])]
    assert first.image is not None and first.image.kind == "parquet" and first.image.column == "images"
    assert first.image.load().size == (32, 32)
    with pytest.raises(DataError, match=r"v\.parquet:row 0: has an image \(column 'images'\)"):
        load_preferences(section(path), vision=False)


IMAGE_PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
MALFORMED = [
    (
        {"prompt": [user("Q?"), assistant("A.")], "chosen": [assistant("x")], "rejected": "y"},
        "the prompt must end with a user turn, not 'assistant'",
    ),
    (
        {"prompt": "Q?", "chosen": [{"speaker": "bot", "text": "x"}], "rejected": "y"},
        "field 'chosen' (chosen) message 0 is not a message",
    ),
    (
        {"prompt": "Q?", "chosen": [user("x")], "rejected": "y"},
        "the chosen answer must end with an assistant turn",
    ),
    ({"prompt": "Q?", "chosen": 3, "rejected": "y"}, "must be a string or a non-empty list of messages"),
    (
        {"chosen": [user("Q?"), assistant("x")], "rejected": [user("Other?"), assistant("y")]},
        "share no user turn",
    ),
    (
        {"prompt": IMAGE_PROMPT, "chosen": "x", "rejected": "y"},
        "its prompt shows 1 images and column 'image' holds none",
    ),
]


@pytest.mark.parametrize(("row", "message"), MALFORMED)
def test_malformed_conversations_name_the_row(tmp_path, row, message) -> None:
    good = explicit_rows(2)
    path = write_jsonl(tmp_path / "p.jsonl", [*good, row])
    with pytest.raises(DataError) as error:
        load_preferences(section(path), vision=False)
    text = str(error.value)
    assert "p.jsonl:3" in text and message in text and "\n" not in text


def test_several_images_in_one_row_are_refused(tmp_path) -> None:
    path = write_trl_vision_parquet(tmp_path / "v.parquet", 3, images_per_row=2)
    with pytest.raises(DataError, match=r"v\.parquet:row 0: .*holds 2 images; fedalign trains on one image"):
        load_preferences(section(path), vision=True)


def test_federated_dpo_trains_on_conversational_text_and_trl_vision_data(tmp_path) -> None:
    """The formats go through TRL's DPOTrainer: a text run on implicit-prompt conversations and a LLaVA run
    on the TRL vision format, each 3 clients x 2 rounds; reward accuracy leaves 0 on held-out pairs."""
    text = write_jsonl(tmp_path / "hh.jsonl", implicit_rows(24))
    vision = write_trl_vision_parquet(tmp_path / "rlaif.parquet", 24)
    llava = save_tiny_llava(tmp_path / "tiny-llava")
    for model, data in ((str(TINY_MODEL), text), (str(llava), vision)):
        raw = dpo_recipe(model, data, tmp_path / "runs", source="preference")
        result = run_dpo(validate_recipe(raw), Console(file=io.StringIO(), width=120))
        assert result.metrics_before["reward_accuracy"] == 0.0
        assert result.metrics_after["reward_accuracy"] > 0.5, (data.name, result.metrics_after)


def test_hub_vision_dataset_images_stay_encoded(tmp_path, monkeypatch) -> None:
    """A hub dataset whose ``images`` column is a list of ``Image`` features is read with decoding off, so a
    row's image is a lazy reference to the memory-mapped dataset (the hub is mocked: no network here; the
    dataset object is real, from a parquet shard as the hub serves it)."""
    from fedalign.data import preferences

    shard = write_trl_vision_parquet(tmp_path / "train.parquet", 4)

    def fake_load_dataset(path: str, config: str | None, split: str) -> datasets.Dataset:
        assert (path, split) == ("someone/rlaif-v-formatted", "train")
        return datasets.Dataset.from_parquet(str(shard))

    monkeypatch.setattr(preferences, "hub_unreachable_reason", lambda repo_id, repo_type: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    raw = dpo_recipe(str(TINY_MODEL), Path("someone/rlaif-v-formatted"), Path("unused"), source="preference")
    raw["data"]["path"] = "someone/rlaif-v-formatted"
    loaded = load_preferences(validate_recipe(raw).data, vision=True)
    image = loaded.examples[2].image
    assert image is not None and image.kind == "dataset" and image.column == "images"
    assert image.handle.features["images"].feature.decode is False
    assert image.load().size == (32, 32)
