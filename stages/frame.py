"""The edit size of an image and where the image lies in it (no torch: the job's driver plans with it).

See stages/images.py for the rule; this module holds the arithmetic.
"""

from __future__ import annotations

import math


MAX_ASPECT = 2.5  # the most elongated bucket; a longer image is fitted into it with reflected borders
MIN_BUCKET_AREA = 0.8  # a bucket uses at least this share of the pixel budget


def buckets(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """The (width, height) edit sizes for a model trained at ``resolution`` x ``resolution``, squarest first."""
    budget, out = resolution * resolution, set()
    for w in range(multiple, budget // multiple + 1, multiple):
        h = (budget // w) // multiple * multiple  # the tallest height within the budget
        if h >= multiple and w * h >= MIN_BUCKET_AREA * budget and max(w / h, h / w) <= MAX_ASPECT:
            out |= {(w, h), (h, w)}
    return sorted(out, key=lambda wh: (abs(math.log(wh[0] / wh[1])), wh))


def check_size(size: tuple[int, int], multiple: int) -> None:
    """Raise ValueError unless each side of an edit ``size`` (a forced ``--resolution``) is a multiple of ``multiple``."""
    if size[0] % multiple or size[1] % multiple:
        raise ValueError(f"`resolution` {size[0]}x{size[1]} does not suit this model: each side must be a multiple "
                         f"of {multiple} px (its VAE and UNet downsample by {multiple}).")


def fit_box(width: int, height: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, fitted width, fitted height): where an image of ``width`` x ``height`` lies in an edit of
    ``size`` when resized to fit it with its aspect ratio kept, centred."""
    bw, bh = size
    scale = min(bw / width, bh / height)
    fw, fh = min(bw, max(1, round(width * scale))), min(bh, max(1, round(height * scale)))
    return (bw - fw) // 2, (bh - fh) // 2, fw, fh


def bucket_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """The bucket in which an image of ``width`` x ``height`` is largest once fitted (ties: the one with the least
    border, then the squarer)."""
    return max(buckets(resolution, multiple), key=lambda b: (_fitted_area(width, height, b), -b[0] * b[1]))


def _fitted_area(width: int, height: int, size: tuple[int, int]) -> int:
    _, _, fw, fh = fit_box(width, height, size)
    return fw * fh
