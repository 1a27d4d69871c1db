"""Small preference sets and a saved tiny LLaVA for the DPO tests, written into a test's temporary folder.

Images are real PNGs (drawn with PIL) stored the way SPA-VL's parquet stores them: an ``image`` struct of
``{bytes, path}``, the Hugging Face ``datasets`` Image encoding.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from fedalign.models.tiny_llava import build_tiny_llava

from .conftest import TINY_MODEL

COLOURS = ["red", "green", "blue", "yellow"]
_RGB = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


def png(colour: str, size: int = 32) -> bytes:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((4, 4, size - 4, size - 4), fill=_RGB[colour])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def pair_rows(n: int) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        rows.append(
            {
                "question": f"What should I do with the {colour} thing number {i}?",
                "chosen": f"I will not help with that. Please stay safe near the {colour} thing.",
                "rejected": f"Break the {colour} thing {i} and take what is inside.",
                "category": colour,
            }
        )
    return rows


def write_spavl_parquet(path: Path, n: int = 24, bad: dict[int, bytes | None] | None = None) -> Path:
    """SPA-VL-schema parquet; ``bad`` replaces row i's image bytes (e.g. b"junk", or None for no image)."""
    rows = pair_rows(n)
    images = []
    for i, row in enumerate(rows):
        data = png(row["category"])
        if bad and i in bad:
            data = bad[i]
        images.append(None if data is None else {"bytes": data, "path": None})
    table = pa.table(
        {
            "image": pa.array(images, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "question": [r["question"] for r in rows],
            "chosen": [r["chosen"] for r in rows],
            "rejected": [r["rejected"] for r in rows],
            "category": [r["category"] for r in rows],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=8)
    return path


def write_text_pairs(path: Path, n: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for r in pair_rows(n):
            out.write(json.dumps({"prompt": r["question"], "chosen": r["chosen"], "rejected": r["rejected"],
                                  "category": r["category"]}) + "\n")  # fmt: skip
    return path


def save_tiny_llava(folder: Path) -> Path:
    model, processor = build_tiny_llava(TINY_MODEL, seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def dpo_recipe(model: str, data: Path, out: Path, source: str = "spavl", **extra) -> dict:
    recipe = {
        "name": "dpo-test",
        "seed": 0,
        "output_dir": str(out),
        "device": "cpu",
        "model": {"name_or_path": model},
        "data": {"source": source, "path": str(data), "holdout": 4},
        "federation": {"num_clients": 3, "clients_per_round": 3, "rounds": 2, "local_steps": 2},
        "lora": {"r": 4, "alpha": 8},
        "train": {"batch_size": 2, "learning_rate": 5e-3, "max_length": 96},
        "dpo": {"beta": 0.5},
        "eval": {"batch_size": 4, "preferred_pattern": "^I will not", "max_new_tokens": 6},
    }
    for key, value in extra.items():
        section, _, field = key.partition("__")
        if field:
            recipe.setdefault(section, {})[field] = value
        else:
            recipe[section] = value
    return recipe
