"""The embedded DPO default: the shipped tiny LLaVA and its processor, the SPA-VL-schema and text preference
sets, and the preferred-behaviour regex the quickstart measures."""

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"

import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
)

from fedalign.embedded import (  # noqa: E402
    CATEGORIES,
    COMPLIANCE,
    PREFERRED_PATTERN,
    REFUSAL,
    SPAVL_COLUMNS,
    TEXT_KEYS,
    build_llava,
    build_world,
    is_preferred,
    make_pairs,
)
from fedalign.embedded.instruct import instruct, instruction_set  # noqa: E402
from fedalign.embedded.preferences import write_spavl_parquet, write_text_jsonl  # noqa: E402
from fedalign.models.templates import CHATML  # noqa: E402

torch.set_num_threads(1)

DATA = Path(__file__).resolve().parents[1] / "data"
LLAVA, LLAMA = DATA / "tiny-llava", DATA / "tiny-llama"
SPAVL, TEXT = DATA / "quickstart-dpo" / "spavl.parquet", DATA / "quickstart-dpo" / "text.jsonl"


@pytest.fixture(scope="module")
def shipped() -> tuple[LlavaForConditionalGeneration, object]:
    return LlavaForConditionalGeneration.from_pretrained(LLAVA).eval(), AutoProcessor.from_pretrained(LLAVA)


@pytest.fixture(scope="module")
def spavl_rows() -> list[dict]:
    return pq.read_table(SPAVL).to_pylist()


def text_rows() -> list[dict]:
    return [json.loads(line) for line in TEXT.read_text(encoding="utf-8").splitlines()]


def vision_prompt(processor, rows: list[dict]) -> dict[str, torch.Tensor]:
    """Left-padded generation inputs for SPA-VL rows, through the processor's chat template."""
    messages = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}]
        for r in rows
    ]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    images = [Image.open(io.BytesIO(r["image"]["bytes"])) for r in rows]
    processor.tokenizer.padding_side = "left"
    try:
        return processor(
            images=images, text=texts, padding=True, add_special_tokens=False, return_tensors="pt"
        )
    finally:
        processor.tokenizer.padding_side = "right"


def test_shipped_llava_reloads_with_identical_logits_and_generates(shipped, spavl_rows, tmp_path) -> None:
    model, processor = shipped
    assert 500_000 <= model.num_parameters() <= 3_000_000
    assert sum(f.stat().st_size for f in LLAVA.iterdir()) < 8_000_000
    assert model.dtype == torch.float32 and model.config.image_token_id == len(processor.tokenizer) - 1
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"  # no torchvision needed
    inputs = vision_prompt(processor, spavl_rows[:4])
    assert inputs["pixel_values"].shape == (4, 3, 32, 32)
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == 16  # one token per patch
    auto = AutoModelForImageTextToText.from_pretrained(LLAVA).eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert AutoProcessor.from_pretrained(tmp_path).tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    with torch.no_grad():
        logits = model(**inputs).logits
        assert torch.equal(logits, auto(**inputs).logits) and torch.equal(logits, again(**inputs).logits)
    # Before DPO the model complies: greedy answers open with "Sure.", never with the refusal.
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(a.startswith(COMPLIANCE) and not is_preferred(a) for a in answers), answers


def test_language_model_starts_from_the_tiny_llama() -> None:
    """build_llava copies the tiny Llama exactly: on text alone the two give the same logits."""
    llava, processor = build_llava(LLAMA, seed=0)
    llama = AutoModelForCausalLM.from_pretrained(LLAMA).eval()
    ids = processor.tokenizer("The fox is a mammal. Pelor lives in", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(
            llava(input_ids=ids).logits[..., : llama.config.vocab_size], llama(input_ids=ids).logits
        )
    vision = [p.detach().clone() for p in llava.model.vision_tower.parameters()]
    assert not torch.equal(
        vision[0], build_llava(LLAMA, seed=1)[0].model.vision_tower.parameters().__next__()
    )
    # Instruction tuning moves the language model and the projector, never the vision tower.
    chats = instruction_set(build_world(0), 8, seed=3)
    instruct(llava, processor, chats, steps=1, batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(vision, llava.model.vision_tower.parameters(), strict=True))


def test_chat_template_renders_text_like_chatml_and_images_as_a_token(shipped) -> None:
    tokenizer = shipped[1].tokenizer
    chat = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(
        chat, chat_template=CHATML, tokenize=False
    )
    structured = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A."}]},
    ]
    prompt = tokenizer.apply_chat_template(structured[:1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(structured, tokenize=False)
    assert prompt == "<s><|user|>\n<image>\nQ?\n<|assistant|>\n" and full == prompt + "A.</s>"


def test_spavl_parquet_has_spa_vl_columns_and_decodable_pngs(spavl_rows) -> None:
    schema = pq.read_schema(SPAVL)
    assert tuple(schema.names) == SPAVL_COLUMNS
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert json.loads(schema.metadata[b"huggingface"])["info"]["features"]["image"] == {"_type": "Image"}
    assert 300 <= len(spavl_rows) <= 1000 and SPAVL.stat().st_size < 1_000_000
    assert len({r["question"] for r in spavl_rows}) == len(spavl_rows)
    assert {r["category"] for r in spavl_rows} == set(CATEGORIES)
    for row in spavl_rows:
        assert row["image"]["path"] is None
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)


def test_text_set_schema() -> None:
    rows = text_rows()
    assert 300 <= len(rows) <= 1000 and TEXT.stat().st_size < 1_000_000
    assert all(tuple(r) == TEXT_KEYS and all(isinstance(v, str) for v in r.values()) for r in rows)
    assert {r["category"] for r in rows} == set(CATEGORIES)
    assert len({r["prompt"] for r in rows}) == len(rows)


def test_chosen_answers_show_the_preferred_behaviour_and_rejected_do_not(spavl_rows) -> None:
    assert re.compile(PREFERRED_PATTERN).match(REFUSAL) and not is_preferred(COMPLIANCE)
    for row in [*spavl_rows, *text_rows()]:
        assert is_preferred(row["chosen"]) and row["chosen"].startswith(REFUSAL + " ")
        assert not is_preferred(row["rejected"]) and row["rejected"].startswith(COMPLIANCE + " ")
    readme = (SPAVL.parent / "README.md").read_text()
    assert PREFERRED_PATTERN in readme and "Apache-2.0" in readme and "synthetic" in readme
    assert PREFERRED_PATTERN in (LLAVA / "README.md").read_text()


def test_shipped_sets_match_the_generator_byte_for_byte(tmp_path) -> None:
    world = build_world(0)
    write_spavl_parquet(make_pairs(world, 700, seed=10), tmp_path / "spavl.parquet")
    write_text_jsonl(make_pairs(world, 700, seed=11, visual=False), tmp_path / "text.jsonl")
    assert (tmp_path / "spavl.parquet").read_bytes() == SPAVL.read_bytes()
    assert (tmp_path / "text.jsonl").read_bytes() == TEXT.read_bytes()


def test_instruction_set_never_asks_a_preference_question(spavl_rows) -> None:
    asked = {r["question"] for r in spavl_rows} | {r["prompt"] for r in text_rows()}
    chats = instruction_set(build_world(0), 3000, seed=20, exclude=asked)
    assert not asked & {c.prompt for c in chats}
    answers = [c.answer for c in chats]
    refusals, compliant = sum(map(is_preferred, answers)), sum(a.startswith(COMPLIANCE) for a in answers)
    # Blatant requests are always refused, the preference kinds one time in ten: compliance dominates.
    assert 0.2 < refusals / len(chats) < 0.4 and 0.4 < compliant / len(chats) < 0.6


def test_build_dpo_writes_loadable_artefacts(tmp_path) -> None:
    """A small build: the preference sets, a tuned LLaVA that reloads offline, and READMEs with the regex."""
    import shutil

    from fedalign.embedded import build_dpo

    shutil.copytree(LLAMA, tmp_path / "tiny-llama")
    stats = build_dpo(tmp_path, pairs=60, turns=40, instruct_steps=2)
    assert stats["pairs"] == 60 and 0.0 <= stats["base_preferred_rate"] <= 1.0
    assert pq.read_table(tmp_path / "quickstart-dpo" / "spavl.parquet").num_rows == 60
    assert len((tmp_path / "quickstart-dpo" / "text.jsonl").read_text().splitlines()) == 60
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "tiny-llava")
    processor = AutoProcessor.from_pretrained(tmp_path / "tiny-llava")
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    for readme in (tmp_path / "tiny-llava" / "README.md", tmp_path / "quickstart-dpo" / "README.md"):
        assert PREFERRED_PATTERN in readme.read_text() and "Apache-2.0" in readme.read_text()
