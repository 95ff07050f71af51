"""Inputs: shard lists, shard checks, and one WebDataset sample -> a normalised record (CPU).

Ray's ``read_webdataset(decoder=None)`` gives one row per sample with one column per member extension
(``png``, ``txt``, ``json``, ``cls``, ``mask.png``, ...) as raw bytes. When samples of a shard carry
different members, the missing ones arrive as None or NaN: every accessor here treats those as absent.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import tarfile
from dataclasses import dataclass

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MASK_MEMBERS = ("mask.png", "mask")
DEFAULT_MAX_PIXELS = 64_000_000  # larger images are refused (decompression-bomb guard)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Paths, globs and brace patterns (``coco-{000000..000099}.tar``) -> shard URLs, in order, deduplicated."""
    from braceexpand import braceexpand

    out: list[str] = []
    for item in inputs:
        for path in braceexpand(item):
            if "://" in path:
                out.append(path)  # s3://, gs://, ...: read through pyarrow/fsspec as given
            elif any(c in path for c in "*?["):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise FileNotFoundError(f"No shard matches {path!r}.")
                out += matches
            else:
                out.append(os.path.abspath(path))
    return list(dict.fromkeys(out))


def check_local_shard(path: str) -> str | None:
    """None for a readable tar, else why it is not (missing, empty, not a tar, truncated)."""
    if "://" in path:
        return None  # remote: Ray reads it; failures there are reported by Ray
    if not os.path.exists(path):
        return f"shard {path} does not exist"
    size = os.path.getsize(path)
    if size == 0:
        return f"shard {path} is empty (0 bytes)"
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        return f"shard {path} is not a readable tar: {exc}"
    if members:
        last = members[-1]
        if last.offset_data + last.size > size:
            return f"shard {path} is truncated: its last member {last.name!r} ends past the end of the file"
    return None


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _text(value) -> str | None:
    if not _present(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace").strip()
    return str(value).strip()


@dataclass
class Sample:
    key: str
    shard: str
    image: bytes | None
    caption: str | None
    label: str | None
    mask: bytes | None
    error: str | None = None


def _member(row: dict, ext: str):
    """The member with extension ``ext``. A key holding dots (``a/b..c``) shifts part of itself into the
    extension (webdataset splits at the first dot), so ``x.jpg`` counts as ``jpg`` too."""
    if _present(row.get(ext)):
        return row[ext]
    for name, value in row.items():
        if name.endswith("." + ext) and name not in MASK_MEMBERS and not name.startswith("__") and _present(value):
            return value
    return None


def sample_from_row(row: dict, caption_field: str = "txt") -> Sample:
    """One ``read_webdataset`` row -> a Sample; a missing image sets ``error``.

    ``caption_field`` is ``txt`` (the txt member, else the json member's ``caption``) or the name of a
    field of the json member.
    """
    key = _text(row.get("__key__")) or "<no key>"
    shard = _text(row.get("__url__")) or ""
    image = next((bytes(v) for v in (_member(row, e) for e in IMAGE_EXTENSIONS) if v is not None), None)
    caption = _text(_member(row, "txt")) if caption_field == "txt" else None
    if caption is None and _member(row, "json") is not None:
        try:
            meta = json.loads(_text(_member(row, "json")) or "{}")
            field = "caption" if caption_field == "txt" else caption_field
            caption = _text(meta.get(field)) if isinstance(meta, dict) else None
        except json.JSONDecodeError:
            pass
    label = _text(_member(row, "cls"))
    mask = next((bytes(v) for v in (_member(row, m) for m in MASK_MEMBERS) if v is not None), None)
    error = None
    if image is None:
        found = sorted(k for k, v in row.items() if not k.startswith("__") and _present(v))
        error = f"no image member ({'/'.join(IMAGE_EXTENSIONS)}) in sample; members: {found}"
    return Sample(key, shard, image, caption, label, mask, error)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode fully (truncation shows here), refusing images over ``max_pixels``; raises ValueError."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (--max-pixels)")
            im.load()
            im = ImageOps.exif_transpose(im)  # upright first: the sizes recorded are the upright ones
            return im.copy() if im.mode != "P" else im.convert("RGBA")
    except ValueError:
        raise
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image refused as a decompression bomb: {exc}") from exc
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ValueError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
