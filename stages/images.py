"""Images in and out of the model: mode conversion, EXIF rotation, the edit size, fitting and unfitting.

The edit size (``stages.frame.bucket_size``): the model's pixel budget (its training resolution squared) at one of a few
aspect-ratio buckets (``stages.frame.buckets``): every (width, height) whose sides are multiples of what the VAE and the
UNet need (``DiffEditModel.size_multiple``: 64 px for Stable Diffusion), whose area is at most the budget and
at least :data:`MIN_BUCKET_AREA` of it, and whose aspect ratio is at most :data:`MAX_ASPECT`. For Stable
Diffusion at 512: 512x512, 576x448, 640x384, 768x320 and their transposes. An image goes to the bucket in which,
scaled to fit with its aspect ratio kept, it is largest (ties: the least border, then the squarer bucket). ``--resolution`` forces a size.

Fitting (:func:`fit_images`): the image is resized to fit the edit size with its aspect ratio kept, centred,
and the rest is filled by reflecting the image at its borders (content the model can denoise naturally, not
a flat band it would try to explain). Nothing is stretched: an object keeps its shape. :func:`unfit` crops the
decoded edit (or the mask) back to the image's box and resizes it to the image's own size.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

from ..manifests.schema import SOURCE_FORMATS
from .frame import fit_box

RESAMPLE = Image.Resampling.BICUBIC


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> upright 8-bit RGB. Transparency is composited on white; 16/32-bit scaled to 8-bit."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        if image.mode == "F":
            top = max(float(a.max()), 1.0)
        image = Image.fromarray((np.clip(a / top, 0, 1) * 255 + 0.5).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def images_to_tensor(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """PIL images (any mode, any size) -> images_BCHW in [-1, 1] at resolution x resolution, stretched: for square
    images at the model's resolution (the benchmarks, the reference tests); the job fits (:func:`fit_images`)."""
    arrays = [np.asarray(to_rgb(im).resize((resolution, resolution), RESAMPLE), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def tensor_to_images(images_BCHW: torch.Tensor, sizes: list[tuple[int, int]]) -> list[Image.Image]:
    """images in [-1, 1] -> RGB PIL images resized back to each (width, height)."""
    arr = to_uint8(images_BCHW)
    return [
        Image.fromarray(a).resize(size, RESAMPLE) if a.shape[1::-1] != tuple(size) else Image.fromarray(a)
        for a, size in zip(arr, sizes)
    ]


def fit_images(images: list[Image.Image], size: tuple[int, int]) -> torch.Tensor:
    """PIL images (any mode, any size) -> images_BCHW in [-1, 1] at ``size`` (width, height), each fitted with
    its aspect ratio kept and the border filled by reflection (an image of ``size``'s shape is only resized)."""
    arrays = [fit_array(np.asarray(to_rgb(im)), size, RESAMPLE) for im in images]
    x = torch.from_numpy(np.stack(arrays).astype(np.float32)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def fit_masks(masks: list[Image.Image | np.ndarray], size: tuple[int, int],
              image_sizes: list[tuple[int, int]]) -> torch.Tensor:
    """User masks (nonzero = edit) -> bool mask_BHW at ``size``: each resized (nearest) to its image's size
    (width, height), then fitted as its image is; the border is 0."""
    out = []
    for m, image_size in zip(masks, image_sizes, strict=True):
        m = m if isinstance(m, Image.Image) else Image.fromarray((np.asarray(m) > 0).astype(np.uint8) * 255)
        m = ImageOps.exif_transpose(m).convert("L")
        a = np.asarray(m if m.size == tuple(image_size) else m.resize(image_size, Image.Resampling.NEAREST)) > 127
        out.append(fit_array(a.astype(np.uint8), size, Image.Resampling.NEAREST, pad="constant") > 0)
    return torch.from_numpy(np.stack(out))


def fit_array(a: np.ndarray, size: tuple[int, int], resample, pad: str = "reflect") -> np.ndarray:
    """An H x W (x C) uint8 array resized into its :func:`fit_box` in ``size`` and padded (``pad``) around it."""
    h, w = a.shape[:2]
    left, top, fw, fh = fit_box(w, h, size)
    if (fw, fh) != (w, h):
        a = np.asarray(Image.fromarray(a).resize((fw, fh), resample))
    widths = [(top, size[1] - fh - top), (left, size[0] - fw - left)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, widths, mode=pad) if any(map(any, widths)) else a


def unfit(a: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    """An H x W (x C) uint8 array at an edit size -> the image's box in it, resized to ``size`` (width, height)."""
    left, top, fw, fh = fit_box(*size, (a.shape[1], a.shape[0]))
    box = a[top : top + fh, left : left + fw]
    return box if (fw, fh) == tuple(size) else np.asarray(Image.fromarray(box).resize(tuple(size), resample))


def to_uint8(images_BCHW: torch.Tensor) -> np.ndarray:
    """images in [-1, 1] -> B x H x W x 3 uint8."""
    return ((images_BCHW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def source_bytes(data: bytes, rgb: Image.Image) -> bytes:
    """The bytes that store the image an edit was made from: the input's own when they decode to ``rgb`` as they
    are (8-bit RGB JPEG, PNG or WebP, one frame, upright), else ``rgb`` as a PNG (greyscale, alpha, 16-bit,
    EXIF-rotated, other formats)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            as_is = (im.format in SOURCE_FORMATS and im.mode == "RGB" and getattr(im, "n_frames", 1) == 1
                     and im.getexif().get(0x0112, 1) == 1 and im.size == rgb.size)
    except Exception:  # the caller decoded it already; a second look that fails just means: re-encode
        as_is = False
    if as_is:
        return data
    buf = io.BytesIO()
    rgb.save(buf, "PNG", compress_level=1)
    return buf.getvalue()
