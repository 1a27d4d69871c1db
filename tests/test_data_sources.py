"""Data sources: each source's mapping to prompt/completion, file formats, row-naming errors, holdouts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedalign.data.sources import load_examples, split_holdout
from fedalign.errors import DataError
from fedalign.recipe import DataSection

GSM8K = Path(__file__).parent / "fixtures" / "gsm8k" / "train.jsonl"

DOLLY_ROWS = [
    {
        "instruction": "When did Virgin Australia start operating?",
        "context": "Virgin Australia commenced services on 31 August 2000.",
        "response": "Virgin Australia started operating on 31 August 2000.",
        "category": "closed_qa",
    },
    {
        "instruction": "Name three primary colours.",
        "context": "",
        "response": "Red, yellow, blue.",
        "category": "brainstorming",
    },
    {
        "instruction": "Is a whale a fish?",
        "context": "   ",
        "response": "No, a mammal.",
        "category": "open_qa",
    },
]
METAMATH_ROWS = [
    {"query": "What is 2 + 3?", "response": "2 + 3 = 5. The answer is: 5", "type": "GSM_Rephrased"},
    {"query": "Solve x + 1 = 4.", "response": "x = 3. The answer is: 3", "type": "MATH_AnsAug"},
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def section(source: str, path: Path | str, **kwargs: Any) -> DataSection:
    return DataSection(source=source, path=str(path), **kwargs)


def test_gsm8k_real_rows_keep_the_answer_with_its_final_line() -> None:
    examples = load_examples(section("gsm8k", GSM8K))
    raw = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    assert len(examples) == len(raw) == 20
    assert [e.row_id for e in examples] == list(range(20))
    first = examples[0]
    assert first.prompt == [{"role": "user", "content": raw[0]["question"]}]
    assert first.completion == [{"role": "assistant", "content": raw[0]["answer"]}]
    assert first.completion[0]["content"].splitlines()[-1] == "#### 72"
    assert first.label is None
    assert first.origin == f"{GSM8K}:1" and examples[19].origin == f"{GSM8K}:20"


def test_dolly_context_goes_into_the_prompt_only_when_present(tmp_path: Path) -> None:
    examples = load_examples(section("dolly", write_jsonl(tmp_path / "dolly.jsonl", DOLLY_ROWS)))
    with_context, empty, blank = (e.prompt[-1]["content"] for e in examples)
    assert with_context == (
        "When did Virgin Australia start operating?\n\nContext:\n"
        "Virgin Australia commenced services on 31 August 2000."
    )
    assert empty == "Name three primary colours." and "Context:" not in blank
    assert examples[0].completion == [
        {"role": "assistant", "content": "Virgin Australia started operating on 31 August 2000."}
    ]
    assert [e.label for e in examples] == ["closed_qa", "brainstorming", "open_qa"]


def test_metamathqa_from_json_list_uses_type_as_label(tmp_path: Path) -> None:
    path = tmp_path / "metamath.json"
    path.write_text(json.dumps(METAMATH_ROWS))
    examples = load_examples(section("metamathqa", path))
    assert [e.label for e in examples] == ["GSM_Rephrased", "MATH_AnsAug"]
    assert examples[1].prompt == [{"role": "user", "content": "Solve x + 1 = 4."}]
    assert examples[1].origin == f"{path}:row 1"


def test_system_prompt_leads_every_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", METAMATH_ROWS)
    examples = load_examples(section("metamathqa", path, system_prompt="Think step by step."))
    for example in examples:
        assert example.prompt[0] == {"role": "system", "content": "Think step by step."}
        assert example.prompt[1]["role"] == "user" and len(example.prompt) == 2


def test_column_renames_and_label_column_override(tmp_path: Path) -> None:
    rows = [{"question": "Q?", "answer": "A.", "topic": 7, "category": "ignored"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = section(
        "dolly", path, columns={"instruction": "question", "response": "answer"}, label_column="topic"
    )
    (example,) = load_examples(data)
    assert example.prompt == [{"role": "user", "content": "Q?"}]
    assert example.completion[0]["content"] == "A."
    assert example.label == "7"  # labels become strings


def test_local_parquet_with_mapping_context_label_and_row_system(tmp_path: Path) -> None:
    path = tmp_path / "local.parquet"
    table = {
        "q": ["Translate: cat", "Translate: dog"],
        "a": ["chat", "chien"],
        "ctx": ["French", None],
        "lang": ["fr", "fr"],
        "sys": ["You translate.", ""],
    }
    pq.write_table(pa.table(table), path)
    columns = {"prompt": "q", "completion": "a", "context": "ctx", "label": "lang", "system": "sys"}
    first, second = load_examples(section("local", path, columns=columns, system_prompt="Default."))
    assert first.prompt == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Translate: cat\n\nContext:\nFrench"},
    ]
    assert second.prompt[0] == {"role": "system", "content": "Default."}  # empty row value: the default
    assert second.prompt[1]["content"] == "Translate: dog"
    assert (first.label, second.origin) == ("fr", f"{path}:row 1")


def test_local_needs_prompt_and_completion_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(DataError, match="needs a column for completion"):
        load_examples(section("local", path, columns={"prompt": "q"}))
    with pytest.raises(DataError, match="unknown field 'answer'"):
        load_examples(section("local", path, columns={"prompt": "q", "completion": "a", "answer": "a"}))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "Hi"}, "missing required field 'response' (dolly rows need instruction, response)"),
        ({"instruction": "Hi", "response": None}, "missing required field 'response'"),
        ({"instruction": "Hi", "response": ""}, "required field 'response' is empty"),
        ({"instruction": 3, "response": "x"}, "field 'instruction' must be a string, got int"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    path = tmp_path / "dolly.jsonl"
    path.write_text(json.dumps(DOLLY_ROWS[0]) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as info:
        load_examples(section("dolly", path))
    text = str(info.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


def test_blank_lines_are_skipped_and_bad_json_lines_named(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    good = json.dumps({"question": "q", "answer": "#### 1"})
    path.write_text(f"\n{good}\n\n{good}\n")
    assert [e.origin for e in load_examples(section("gsm8k", path))] == [f"{path}:2", f"{path}:4"]
    path.write_text(f"{good}\n{{not json\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid JSON"):
        load_examples(section("gsm8k", path))
    path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: expected a JSON object"):
        load_examples(section("gsm8k", path))


def test_folder_picks_the_split_files_in_order(tmp_path: Path) -> None:
    row = {"question": "q", "answer": "a"}
    write_jsonl(tmp_path / "train-00001.jsonl", [row | {"question": "second"}])
    write_jsonl(tmp_path / "train-00000.jsonl", [row | {"question": "first"}])
    write_jsonl(tmp_path / "test.jsonl", [row | {"question": "held out"}])
    train = load_examples(section("gsm8k", tmp_path))
    assert [e.prompt[0]["content"] for e in train] == ["first", "second"]
    assert [e.row_id for e in train] == [0, 1]
    test = load_examples(
        section("gsm8k", tmp_path, eval_path=str(tmp_path)), path=str(tmp_path), split="test"
    )
    assert [e.prompt[0]["content"] for e in test] == ["held out"]
    with pytest.raises(DataError, match=r"data.path: folder .* no file for split 'validation'.*test.jsonl"):
        load_examples(section("gsm8k", tmp_path, split="validation"))


def test_folder_with_a_single_file_uses_it_for_any_split(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "databricks-dolly-15k.jsonl", DOLLY_ROWS)
    assert len(load_examples(section("dolly", tmp_path))) == 3


def test_max_rows_keeps_the_first_rows() -> None:
    examples = load_examples(section("gsm8k", GSM8K, max_rows=5))
    assert [e.origin for e in examples] == [f"{GSM8K}:{n}" for n in range(1, 6)]


def test_missing_local_path_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^data.path: '.*nope.jsonl' does not exist$"):
        load_examples(section("gsm8k", tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        load_examples(section("gsm8k", tmp_path / "empty.jsonl"))


def test_hub_id_offline_fails_fast_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_examples(section("dolly", "databricks/databricks-dolly-15k"))
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("data.path: 'databricks/databricks-dolly-15k' is not a local file")
    assert "offline" in text and "data.path=/path/to/" in text


def test_reachable_hub_id_is_loaded_with_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from fedalign.data import sources

    calls: list[tuple[str, str | None, str]] = []

    def fake_load_dataset(path: str, config: str | None, split: str) -> list[dict[str, str]]:
        calls.append((path, config, split))
        return METAMATH_ROWS

    monkeypatch.setattr(sources, "hub_unreachable_reason", lambda repo_id, repo_type: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_examples(section("metamathqa", "meta-math/MetaMathQA"))
    assert calls == [("meta-math/MetaMathQA", None, "train")]
    assert [e.origin for e in examples] == [
        "meta-math/MetaMathQA[train]:row 0",
        "meta-math/MetaMathQA[train]:row 1",
    ]
    assert examples[0].label == "GSM_Rephrased"


def test_eval_path_errors_name_the_eval_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = section("gsm8k", GSM8K, eval_path="openai/gsm8k")
    with pytest.raises(DataError, match=r"^data.eval_path: 'openai/gsm8k' .*data.eval_path=/path/to/"):
        load_examples(data, path=data.eval_path, split=data.eval_split)


def test_holdout_sizes_determinism_and_order() -> None:
    examples = load_examples(section("gsm8k", GSM8K))
    train, held = split_holdout(examples, 0.25, seed=3)
    assert (len(train), len(held)) == (15, 5)
    assert {e.row_id for e in train} | {e.row_id for e in held} == set(range(20))
    assert [e.row_id for e in held] == sorted(e.row_id for e in held)
    again = split_holdout(examples, 0.25, seed=3)
    assert [e.row_id for e in again[1]] == [e.row_id for e in held]
    others = {tuple(e.row_id for e in split_holdout(examples, 0.25, seed=s)[1]) for s in range(5)}
    assert len(others) > 1  # the seed matters
    assert len(split_holdout(examples, 3, seed=0)[1]) == 3
    assert len(split_holdout(examples, 0.01, seed=0)[1]) == 1  # a fraction > 0 holds out at least one
    train, held = split_holdout(examples, 0, seed=0)
    assert held == [] and len(train) == 20


def test_holdout_that_leaves_no_training_rows_is_an_error() -> None:
    examples = load_examples(section("gsm8k", GSM8K, max_rows=4))
    with pytest.raises(DataError, match="would leave no training rows"):
        split_holdout(examples, 4, seed=0)
    with pytest.raises(DataError, match="whole number"):
        split_holdout(examples, 2.5, seed=0)
