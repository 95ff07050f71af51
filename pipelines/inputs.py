"""Inputs: shard lists, one WebDataset sample -> a normalised record, and image decoding (CPU).

``pipelines.shards.iter_shard`` reads a shard's samples as raw member bytes by extension (``png``, ``txt``,
``json``, ``cls``, ``mask.png``, ...); ``sample_from_raw`` picks the image, caption, label and mask out of
them, and turns anything unusable (no image, a json member that does not parse) into the sample's error.
"""

from __future__ import annotations

import glob
import io
import json
import os
from dataclasses import dataclass

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")  # the members taken as the image
MASK_MEMBERS = ("mask.png", "mask")
DEFAULT_MAX_PIXELS = 64_000_000  # larger images are refused (decompression-bomb guard)
# The formats a dataset image (or mask) can be. PIL identifies a file by its content, not its name, so without
# this list a member named .jpg holding EPS would be handed to Ghostscript, or a PSD/ICNS/... to its plugin.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO (phone photos)


def canonical_shard(path: str) -> str:
    """A shard's identity (the ``shard`` column, and part of every edit id): a URL as given, a local path
    resolved to its absolute real path, so that the same file named twice, or from another working folder,
    is one shard."""
    return path if "://" in path else os.path.realpath(path)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Paths, globs and brace patterns (``coco-{000000..000099}.tar``) -> canonical shard URLs, in order,
    deduplicated. A local path that does not exist, or a glob that matches nothing, is refused."""
    from braceexpand import braceexpand

    out: list[str] = []
    for item in inputs:
        for path in braceexpand(item):
            if "://" in path:
                out.append(path)  # s3://, gs://, http://, ...: read by pipelines.shards, errors become rows
            elif any(c in path for c in "*?["):
                matches = sorted(m for m in glob.glob(path) if os.path.isfile(m))
                if not matches:
                    raise FileNotFoundError(f"No shard matches {path!r}.")
                out += matches
            elif os.path.isdir(path):
                raise FileNotFoundError(f"{path!r} is a folder, not a shard; pass its shards, e.g. '{path}/*.tar'.")
            elif not os.path.exists(path):
                raise FileNotFoundError(f"No shard at {path!r}.")
            else:
                out.append(path)
    return list(dict.fromkeys(canonical_shard(p) for p in out))


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace").strip()


@dataclass
class Sample:
    key: str
    shard: str
    image: bytes | None
    caption: str | None
    label: str | None
    mask: bytes | None
    error: str | None = None
    json: str | None = None  # the json member, a JSON object as text (the manifest's input_json)


def _member(members: dict[str, bytes], ext: str) -> bytes | None:
    """The member with extension ``ext``. A key holding dots (``a/b..c``) shifts part of itself into the
    extension (webdataset splits at the first dot), so ``x.jpg`` counts as ``jpg`` too."""
    if ext in members:
        return members[ext]
    return next((v for name, v in members.items() if name.endswith("." + ext) and name not in MASK_MEMBERS), None)


def parse_json_member(data: bytes) -> dict:
    """A sample's json member -> a dict; ValueError (naming the problem) for anything else, including
    nesting too deep for the parser and integers too long to convert."""
    try:
        meta = json.loads(data.decode("utf-8", errors="replace"))
    except RecursionError:
        raise ValueError("json member is nested too deeply to parse") from None
    except ValueError as exc:  # JSONDecodeError, and the int-digits limit
        raise ValueError(f"json member is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"json member holds a {type(meta).__name__}, not an object")
    return meta


def sample_from_raw(raw, shard: str, caption_field: str = "txt") -> Sample:
    """One sample read by ``pipelines.shards.iter_shard`` -> a Sample; anything unusable sets ``error``.

    ``caption_field`` is ``txt`` (the txt member, else the json member's ``caption``) or the name of a
    field of the json member.
    """
    members = raw.members
    image = next((v for v in (_member(members, e) for e in IMAGE_EXTENSIONS) if v is not None), None)
    mask = next((v for v in (_member(members, m) for m in MASK_MEMBERS) if v is not None), None)
    sample = Sample(raw.key, shard, image, None, _text(_member(members, "cls")), mask, raw.error)
    if sample.error:
        return sample
    raw_json = _member(members, "json")
    try:
        meta = parse_json_member(raw_json) if raw_json is not None else {}
    except ValueError as exc:
        sample.error = str(exc)
        return sample
    sample.json = None if raw_json is None else raw_json.decode("utf-8", errors="replace")
    sample.caption = _text(_member(members, "txt")) if caption_field == "txt" else None
    if sample.caption is None:
        value = meta.get("caption" if caption_field == "txt" else caption_field)
        sample.caption = value.strip() if isinstance(value, str) else None
    if image is None:
        sample.error = f"no image member ({'/'.join(IMAGE_EXTENSIONS)}) in sample; members: {sorted(members)}"
    return sample


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode fully (truncation shows here), refusing images over ``max_pixels``; raises ValueError."""
    try:
        Image.init()  # registers every plugin once (WEBP and TIFF are not among PIL's preloaded ones)
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
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
    except Image.UnidentifiedImageError:
        raise ValueError(f"cannot decode image: not one of the formats {', '.join(IMAGE_FORMATS)}") from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ValueError(f"cannot decode image: {type(exc).__name__}: {str(exc)[:300]}") from exc
