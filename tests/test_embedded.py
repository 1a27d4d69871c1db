"""The embedded default: offline builders, the shipped tiny Llama and the synthetic Dolly-schema data."""

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"

import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from fedalign.embedded import DOLLY_KEYS, build_world, corpus, main, make_dataset  # noqa: E402
from fedalign.models.templates import CHATML  # noqa: E402
from fedalign.models.tiny import build_tiny_llama, build_tokenizer, pretrain  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"
SHIPPED_MODEL = DATA / "tiny-llama"
SHIPPED_ROWS = DATA / "quickstart" / "dolly.jsonl"
DOLLY_CATEGORIES = {
    "open_qa",
    "closed_qa",
    "classification",
    "information_extraction",
    "brainstorming",
    "summarization",
    "creative_writing",
    "general_qa",
}


def conversation(row: dict[str, str]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The prompt/completion pair the project's Dolly loader makes of a row."""
    content = row["instruction"] + ("\n\nContext:\n" + row["context"] if row["context"] else "")
    return [{"role": "user", "content": content}], [{"role": "assistant", "content": row["response"]}]


def read_rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small_corpus() -> list[str]:
    return corpus(build_world(0), random.Random(1), repeats=2)


def test_tokenizer_and_model_round_trip(tmp_path: Path, small_corpus: list[str]) -> None:
    tokenizer = build_tokenizer(small_corpus, vocab_size=400)
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model.eval()
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == special
    assert len({*special, tokenizer.unk_token_id}) == 4
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    text = "Ünïcode and new words round-trip too: <|user|> zebra\n"
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tok.decode(loaded_tok(text)["input_ids"]) == text
    assert loaded_tok.chat_template == CHATML
    for marker in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert len(loaded_tok(marker, add_special_tokens=False)["input_ids"]) == 1
    ids = torch.tensor([tokenizer(small_corpus[0])["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_builders_are_seeded_and_leave_the_global_rng_alone(small_corpus: list[str]) -> None:
    tokenizer = build_tokenizer(small_corpus, vocab_size=400)
    kwargs = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    weights = []
    for _ in range(2):
        model = build_tiny_llama(tokenizer, seed=7, **kwargs)
        losses = pretrain(model, tokenizer, small_corpus, steps=3, batch_size=2, block_size=32, seed=7)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(weights[0], weights[1])
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    seed_7, seed_8 = (build_tiny_llama(tokenizer, seed=s, **kwargs).model.embed_tokens.weight for s in (7, 8))
    assert not torch.equal(seed_7, seed_8)


def test_dataset_is_deterministic_dolly_schema() -> None:
    world = build_world(0)
    rows = make_dataset(world, 300, seed=5)
    assert rows == make_dataset(build_world(0), 300, seed=5)
    assert rows != make_dataset(world, 300, seed=6)
    assert all(tuple(row) == DOLLY_KEYS and all(isinstance(v, str) for v in row.values()) for row in rows)
    assert {row["category"] for row in rows} == DOLLY_CATEGORIES
    assert len({(row["instruction"], row["context"]) for row in rows}) == len(rows)
    for row in rows:  # context questions are about strangers: their answer is in the context
        if row["category"] == "closed_qa":
            assert row["response"].removeprefix("According to the text, ") in row["context"]


def test_quick_build_writes_loadable_artefacts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--out", str(tmp_path), "--quick", "--rows", "200"])
    assert "tiny-llama" in capsys.readouterr().out
    rows = read_rows(tmp_path / "quickstart" / "dolly.jsonl")
    assert len(rows) == 200 and all(tuple(row) == DOLLY_KEYS for row in rows)
    assert "synthetic" in (tmp_path / "quickstart" / "README.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama")
    assert model.dtype == torch.float32 and model.config.vocab_size == len(tokenizer)
    prompt, _ = conversation(rows[0])
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_shipped_rows_match_the_generator() -> None:
    rows = read_rows(SHIPPED_ROWS)
    assert rows == make_dataset(build_world(0), len(rows), seed=0)
    assert 2000 <= len(rows) <= 3000 and SHIPPED_ROWS.stat().st_size < 1_000_000
    assert {row["category"] for row in rows} == DOLLY_CATEGORIES
    assert "Apache-2.0" in (SHIPPED_ROWS.parent / "README.md").read_text()


def test_shipped_model_chat_template_prefix_and_eos() -> None:
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL)
    assert model.dtype == torch.float32
    assert 500_000 <= model.num_parameters() <= 3_000_000
    assert sum(f.stat().st_size for f in SHIPPED_MODEL.iterdir()) < 12_000_000
    assert tokenizer.chat_template == CHATML
    assert tokenizer.model_max_length == model.config.max_position_embeddings
    for row in read_rows(SHIPPED_ROWS):
        prompt, completion = conversation(row)
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
        full_ids = tokenizer.apply_chat_template(prompt + completion, return_dict=False)
        assert full_ids[: len(prompt_ids)] == prompt_ids
        assert full_ids[0] == tokenizer.bos_token_id and full_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(full_ids[len(prompt_ids) : -1]) == row["response"]
        assert len(full_ids) <= 128  # the quickstart's max_length truncates no completion
