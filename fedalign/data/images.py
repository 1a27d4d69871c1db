"""Images referenced, not held: checked once at load, decoded only when a batch needs them.

SPA-VL's training split is 93k images (3.8 GB of parquet). A client must never hold its shard's images in
memory, so a row carries an :class:`ImageRef` (a file path, or a row of a parquet file or of a
memory-mapped hub dataset) and the image is decoded when its batch is collated. Every image is opened and
checked once while the data is loaded, so a corrupt, cut-short or missing image is reported with its row
before the run starts rather than halfway through it. The check decodes nothing for the common formats (a
PNG's chunk checksums are read to its end, a JPEG must end with its end-of-image marker); an image of any
other format, or a JPEG that does not end so, is decoded once to find out.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from fedalign.errors import DataError


def _open(data: bytes | str | Path) -> Image.Image:
    return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)


_JPEG_END = b"\xff\xd9"


def _tail(data: bytes | str | Path, size: int = 64) -> bytes:
    if isinstance(data, bytes):
        return data[-size:]
    with open(data, "rb") as handle:
        handle.seek(0, io.SEEK_END)
        handle.seek(max(0, handle.tell() - size))
        return handle.read()


def verify_image(data: bytes | str | Path) -> None:
    """Raise ``ValueError`` (with a short reason) unless ``data`` is a whole, readable image.

    PIL's ``verify`` checks a PNG to its last chunk but nothing of a JPEG, whose truncation only shows when
    it is decoded (in the middle of a run). A JPEG that ends with its end-of-image marker is taken as whole;
    any other image is decoded here once."""
    try:
        with _open(data) as image:
            if image.format == "PNG":
                image.verify()
            elif image.format not in ("JPEG", "MPO") or not _tail(data).rstrip(b"\0").endswith(_JPEG_END):
                image.load()
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"too large to decode ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise ValueError(f"not a readable image ({type(error).__name__}: {error})") from None


@dataclass(frozen=True)
class ImageRef:
    """Where one row's image is: ``file`` (a path), ``parquet`` (row ``index`` of ``location``'s column
    ``column``) or ``dataset`` (row ``index`` of an in-process memory-mapped hub dataset, ``handle``)."""

    kind: str
    location: str
    index: int = 0
    column: str = "image"
    handle: Any = None

    def describe(self) -> str:
        return self.location if self.kind == "file" else f"{self.location} row {self.index} ({self.column!r})"

    def _raw(self) -> bytes | str:
        if self.kind == "file":
            return self.location
        if self.kind == "parquet":
            value = _parquet_cell(self.location, self.column, self.index)
        else:
            value = self.handle[self.index][self.column]
        data = image_bytes_or_path(value)
        if data is None:
            raise ValueError("no image in this row")
        return data

    def load(self) -> Image.Image:
        """The decoded image in RGB (what LLaVA's processor expects); raises DataError naming the image."""
        try:
            with _open(self._raw()) as image:
                return image.convert("RGB")
        except (ValueError, OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
            raise DataError(f"image {self.describe()}: cannot be decoded ({error})") from None


def image_bytes_or_path(value: Any) -> bytes | str | None:
    """An image cell as stored: HF ``Image`` struct ``{bytes, path}``, raw bytes, or a path string; or
    TRL's ``images`` list holding one of these (an empty list is no image). Raises ValueError for a list of
    several: a pair trains on one image."""
    if isinstance(value, list | tuple):
        if len(value) > 1:
            raise ValueError(f"holds {len(value)} images; fedalign trains on one image per pair")
        return image_bytes_or_path(value[0]) if value else None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        return value.get("path") or None
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str) and value:
        return value
    return None


@lru_cache(maxsize=8)
def _row_groups(path: str) -> list[int]:
    """First row index of each row group (and the total at the end) of a parquet file."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    starts = [0]
    for group in range(metadata.num_row_groups):
        starts.append(starts[-1] + metadata.row_group(group).num_rows)
    return starts


@lru_cache(maxsize=4)
def _row_group_column(path: str, column: str, group: int) -> list[Any]:
    """One row group of one column: the unit parquet decompresses, kept for the next few rows asking."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0).to_pylist()


def _parquet_cell(path: str, column: str, index: int) -> Any:
    starts = _row_groups(path)
    group = next(g for g in range(len(starts) - 1) if starts[g] <= index < starts[g + 1])
    return _row_group_column(path, column, group)[index - starts[group]]
