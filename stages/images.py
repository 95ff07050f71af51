"""Images in and out of the model: mode conversion, EXIF rotation, resizing to the model's resolution.

Aspect ratio: every image is resized (stretched) to the model's square resolution, edited there, and the
edit and the mask are resized back to the image's own width and height. Nothing is cropped, so every
pixel of the original has an edited counterpart; a very elongated image is edited at a lower effective
resolution along its long side.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

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
    """PIL images (any mode, any size) -> images_BCHW in [-1, 1] at resolution x resolution."""
    arrays = [np.asarray(to_rgb(im).resize((resolution, resolution), RESAMPLE), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def masks_to_tensor(masks: list[Image.Image | np.ndarray], resolution: int) -> torch.Tensor:
    """User masks (PIL or arrays; nonzero = edit) -> bool mask_BHW at resolution x resolution."""
    out = []
    for m in masks:
        m = m if isinstance(m, Image.Image) else Image.fromarray((np.asarray(m) > 0).astype(np.uint8) * 255)
        m = ImageOps.exif_transpose(m).convert("L").resize((resolution, resolution), Image.Resampling.NEAREST)
        out.append(np.asarray(m) > 127)
    return torch.from_numpy(np.stack(out))


def tensor_to_images(images_BCHW: torch.Tensor, sizes: list[tuple[int, int]]) -> list[Image.Image]:
    """images in [-1, 1] -> RGB PIL images resized back to each (width, height)."""
    arr = ((images_BCHW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [
        Image.fromarray(a).resize(size, RESAMPLE) if a.shape[1::-1] != tuple(size) else Image.fromarray(a)
        for a, size in zip(arr, sizes)
    ]


def mask_to_image(mask_HW: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """A bool mask at any resolution -> an 'L' PIL image (0/255) at (width, height), nearest resampling."""
    m = Image.fromarray(mask_HW.cpu().numpy().astype(np.uint8) * 255, "L")
    return m.resize(size, Image.Resampling.NEAREST) if m.size != tuple(size) else m
