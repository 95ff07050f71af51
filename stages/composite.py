"""The edit returned to the image: the source outside the edit region, pixel for pixel (``--composite mask``).

DiffEdit keeps the background in latent space; the VAE still redraws every pixel, and a resize to the edit
size and back blurs it again. So the final image is the source at its own resolution, with the decoded edit
(resized back) inside the mask and blended into the source over a band of ``feather`` pixels outside it:

    alpha(p) = (feather + 1 - d(p)) / (feather + 1)  for d(p) <= feather, else 0

where d(p) is p's distance to the mask in pixels, in the chessboard metric (0 inside the mask). ``alpha`` is 1
inside the mask and exactly 0 beyond the band: the **edit region** (:func:`edit_region`: the mask and its band)
is where the result may differ from the source, and the **background** (its complement) is where it may not.
This is the one definition of both; the scores use it too (stages/scores.py: ``*_bg`` outside it, ``*_fg``
inside it). Everything here is on H x W (x 3) uint8 arrays and H x W bool masks, on the CPU; the work is done
inside the edit region's bounding box only, so a small edit in a large photo costs little.
"""

from __future__ import annotations

import numpy as np


def _box(mask_HW: np.ndarray, feather: int) -> tuple[slice, slice] | None:
    """The bounding box of the mask grown by ``feather`` pixels (clipped to the image), or None if it is empty."""
    rows, cols = np.flatnonzero(mask_HW.any(axis=1)), np.flatnonzero(mask_HW.any(axis=0))
    if rows.size == 0:
        return None
    h, w = mask_HW.shape
    return (slice(max(0, rows[0] - feather), min(h, rows[-1] + feather + 1)),
            slice(max(0, cols[0] - feather), min(w, cols[-1] + feather + 1)))


def _alpha_in(mask_hw: np.ndarray, feather: int) -> np.ndarray:
    """``alpha`` over a crop that holds the mask grown by ``feather`` (chessboard distance transform)."""
    from scipy.ndimage import distance_transform_cdt

    d = distance_transform_cdt(~mask_hw, metric="chessboard")
    return np.clip((feather + 1 - d) / (feather + 1), 0, 1).astype(np.float32)


def feather_alpha(mask_HW: np.ndarray, feather: int) -> np.ndarray:
    """The blend weight of the edit, float32 H x W in [0, 1]: 1 on the mask, fading to 0 over ``feather`` px."""
    alpha = np.zeros(mask_HW.shape, np.float32)
    box = _box(mask_HW, feather)
    if box is not None:
        alpha[box] = _alpha_in(mask_HW[box], feather)
    return alpha


def edit_region(mask_HW: np.ndarray, feather: int) -> np.ndarray:
    """Bool H x W: the mask and its feathered band, where an edit may change pixels (the rest is background)."""
    return feather_alpha(mask_HW, feather) > 0


def composite(source_HWC: np.ndarray, decoded_HWC: np.ndarray, mask_HW: np.ndarray, feather: int) -> np.ndarray:
    """The source with the decoded edit blended in over the edit region; equal to the source everywhere else
    (an empty mask gives the source back)."""
    if source_HWC.shape != decoded_HWC.shape or source_HWC.shape[:2] != mask_HW.shape:
        raise ValueError(f"source {source_HWC.shape}, edit {decoded_HWC.shape} and mask {mask_HW.shape} must agree.")
    out = source_HWC.copy()
    box = _box(mask_HW, feather)
    if box is None:
        return out
    alpha = _alpha_in(mask_HW[box], feather)[..., None]
    blend = source_HWC[box].astype(np.float32) * (1 - alpha) + decoded_HWC[box].astype(np.float32) * alpha
    out[box] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return out


def changed_outside(source_HWC: np.ndarray, result_HWC: np.ndarray, region_HW: np.ndarray) -> int:
    """How many pixels outside ``region_HW`` differ (in any channel) between the source and the result."""
    if source_HWC.shape != result_HWC.shape:
        raise ValueError(f"source {source_HWC.shape} and result {result_HWC.shape} differ in size.")
    return int((np.any(source_HWC != result_HWC, axis=-1) & ~region_HW).sum())
