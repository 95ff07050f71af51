"""Edit quality scores for (source image, edited image, mask, source prompt, target prompt) pairs.

- ``clip_source`` / ``clip_target``: CLIP cosine similarity of the *edited* image with each prompt.
- ``clip_directional``: cosine between the change of image embedding and the change of text embedding,
  as InstructPix2Pix defines it (Brooks et al., CVPR 2023, Section 3.1 and its ``ClipSimilarity``):
  ``cos(E_img(edit) - E_img(source), E_txt(target) - E_txt(source))`` over L2-normalised embeddings.
  InstructPix2Pix kept pairs with directional >= 0.2 and image >= 0.7.
- ``clip_image``: CLIP cosine of the source and edited images.
- ``lpips``: LPIPS distance (Zhang et al., CVPR 2018) of source and edit, through the ``lpips`` package.
- ``psnr_bg`` / ``ssim_bg``: outside the mask given (what DiffEdit promises to keep); ``psnr_fg`` / ``ssim_fg``
  inside it. The job gives the edit region (the mask and its feathered band, ``stages.composite.edit_region``)
  and the composited edit, so with ``--composite mask`` the background scores are exact: +inf and 1 for PNG. SSIM is Wang et al. 2004's map (11-tap Gaussian window, sigma 1.5, K1 0.01, K2 0.03, as
  scikit-image's ``gaussian_weights=True, use_sample_covariance=False``), averaged over the region's pixels.
- ``mask_fraction``: the share of pixels inside the mask.

A score is ``None`` (a null in the manifest) where it cannot be computed honestly: the CLIP columns when no
CLIP weights are there, ``lpips`` when the LPIPS backbone weights are not there (both with a reason in
:attr:`Scorer.unavailable`, which the job writes to ``run.json``), a region score for an empty region, and
``lpips`` for an image too small for the backbone. Never a score from random weights. Which columns will be
null, and which models and weight files score, :func:`describe_scores` tells from the files alone, without
loading anything (what the job's driver writes to ``run.json``).

Memory per pair is bounded, whatever the image's size or shape:

- ``psnr_bg`` / ``psnr_fg`` / ``mask_fraction`` use every pixel at full resolution, exactly (8-bit squared
  differences summed as integers, row chunks of :data:`PSNR_CHUNK` values). A region whose pixels are all
  identical gets ``+inf`` (scikit-image's convention), every time and only then: the sums have no rounding.
- ``ssim_*`` and ``lpips`` see each pair at most at ``ScoreConfig.max_pixels`` (:data:`SCORE_MAX_PIXELS`,
  1 megapixel): a larger pair is box-averaged down (aspect ratio kept), as Wang et al.'s own ``ssim.m``
  downsamples before SSIM (f x f block means, f = round(min(H, W) / 256)); the mask becomes area weights, each
  small pixel weighted by its share of the region. Pairs up to 1 megapixel (the engine's 512 x 512, SDXL's
  1024 x 1024) are scored at their own size, as before. SSIM runs in float32, one channel at a time, on the
  pair shifted by its mean (which removes float32's cancellation in E[x^2] - E[x]^2): region means within 1e-6
  of float64, the map within 1e-5.
- CLIP: open_clip's transform resizes the short side to its input size S before it crops, so a 1 x 300000
  strip would become 224 x 67 million pixels. An image longer than :data:`CLIP_MAX_ASPECT` : 1 is given to it
  as the centre S x S square that its default (``shortest``) mode keeps, resized from that square's box of the
  source only: the same square, up to PIL's rounding (see :func:`clip_ready`; other modes see a 4:1 centre crop).

Plain PyTorch, no Ray: the job wraps :class:`Scorer` in its own actor. Shape legend: B pairs, D embedding
width, C channels, H x W image.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..manifests.schema import SCORE_COLUMNS as MANIFEST_SCORE_COLUMNS, missing
from .config import SCORE_MAX_PIXELS, ScoreConfig
from .images import to_rgb
from .model import resolve_device
from .sources import (CLIP_MAX_ASPECT, ScoreLoadError, _description, _unavailable, resolve_clip, resolve_lpips,
                      sha256_file)

# What score() returns: the manifest's score columns (named in manifests/schema.py) and the mask's share of the image.
SCORE_COLUMNS = (*MANIFEST_SCORE_COLUMNS, "mask_fraction")
LPIPS_MIN_SIDE = 32  # AlexNet's five pooling stages need at least 32 x 32 pixels; smaller images get a null.
PSNR_CHUNK = 1 << 20  # values per float64 chunk of the PSNR sums (8 MB)


# -- the scores, as functions of tensors -----------------------------------------------------------------


def cosine(a_BD: torch.Tensor, b_BD: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a_BD.float(), b_BD.float(), dim=-1)


def directional_similarity(
    source_image_BD: torch.Tensor, edit_image_BD: torch.Tensor, source_text_BD: torch.Tensor, target_text_BD: torch.Tensor
) -> torch.Tensor:
    """InstructPix2Pix's directional CLIP similarity: the embeddings are L2-normalised first, as in its
    ``ClipSimilarity``, then ``cos(img_edit - img_source, txt_target - txt_source)``."""
    n = lambda x: F.normalize(x.float(), dim=-1)  # noqa: E731
    return cosine(n(edit_image_BD) - n(source_image_BD), n(target_text_BD) - n(source_text_BD))


def squared_error_sums(
    a_BCHW: torch.Tensor, b_BCHW: torch.Tensor, region_BHW: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside_B, total_B): sums of squared differences over the region's pixels and over all pixels, every
    channel. Float64, in chunks of rows of :data:`PSNR_CHUNK` values, so no full-size float copy is made; for
    8-bit images (uint8 tensors) every term and sum is an integer below 2^53, hence exact, and so is
    ``total - inside``, the sum outside the region."""
    B, C, H, W = a_BCHW.shape
    inside_B = torch.zeros(B, dtype=torch.float64, device=a_BCHW.device)
    total_B = torch.zeros(B, dtype=torch.float64, device=a_BCHW.device)
    rows = max(1, PSNR_CHUNK // (B * C * W))
    for top in range(0, H, rows):
        d = a_BCHW[:, :, top : top + rows].double() - b_BCHW[:, :, top : top + rows].double()
        d.mul_(d)
        total_B += d.sum(dim=(1, 2, 3))
        inside_B += (d * region_BHW[:, None, top : top + rows]).sum(dim=(1, 2, 3))
    return inside_B, total_B


def psnr(squared_error_B: torch.Tensor, count_B: torch.Tensor | float, data_range: float = 1.0) -> torch.Tensor:
    """10 log10(R^2 / MSE), MSE = squared_error / count (of values). NaN where count is 0 (an empty region),
    +inf where the squared error is 0 (identical pixels), as scikit-image's ``peak_signal_noise_ratio``."""
    return 10 * torch.log10(data_range**2 / (squared_error_B / count_B))


def region_psnr(a_BCHW: torch.Tensor, b_BCHW: torch.Tensor, region_BHW: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR over the pixels (all channels) of ``region_BHW``: 10 log10(R^2 / MSE). NaN for an empty region,
    +inf for an identical one (as scikit-image's ``peak_signal_noise_ratio``)."""
    inside_B, _ = squared_error_sums(a_BCHW, b_BCHW, region_BHW)
    return psnr(inside_B, region_BHW.sum(dim=(1, 2)).double() * a_BCHW.shape[1], data_range)


def _symmetric_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices of scipy.ndimage's 'reflect' padding (d c b a | a b c d | d c b a), for any pad size."""
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def _blur_along(x: torch.Tensor, kernel: list[float], dim: int) -> torch.Tensor:
    """One pass of a separable filter: a sum of shifted slices of one reflect-padded copy. (conv2d on CPU in
    float64 builds an im2col copy, one value per tap per pixel: 15.9 GB for a 12-megapixel pair's statistics.)"""
    n, radius = x.shape[dim], len(kernel) // 2
    padded = x.index_select(dim, _symmetric_index(n, radius, x.device))
    out = padded.narrow(dim, 0, n) * kernel[0]
    for k in range(1, len(kernel)):
        out.add_(padded.narrow(dim, k, n), alpha=kernel[k])
    return out


def gaussian_filter(x_NHW: torch.Tensor, sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    """A separable Gaussian blur with scipy.ndimage.gaussian_filter's kernel and 'reflect' borders, in x's dtype."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).tolist()
    return _blur_along(_blur_along(x_NHW, kernel, -2), kernel, -1)


def ssim_map(a_BCHW: torch.Tensor, b_BCHW: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5) -> torch.Tensor:
    """The SSIM map of Wang et al. 2004 (eq. 13), per pixel, averaged over channels: B x H x W.

    Local statistics under a Gaussian window (sigma 1.5, 11 taps); population (not sample) covariances;
    C1 = (0.01 R)^2, C2 = (0.03 R)^2. Equal to scikit-image's ``structural_similarity(..., full=True)`` map
    with ``gaussian_weights=True, use_sample_covariance=False``.

    Runs in float32 (float64 if given float64), one channel at a time. Both images are first shifted by the
    pair's mean: variances and covariances do not change, and float32 loses far less in E[x^2] - E[x]^2
    (per pixel within 1e-5 of float64 on smooth 8-bit images, against 4e-4 unshifted). Identical images give
    exactly 1: numerator and denominator are then the same float operations.
    """
    dtype = torch.float64 if a_BCHW.dtype == torch.float64 else torch.float32
    B, C, H, W = a_BCHW.shape
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    blur = lambda z: gaussian_filter(z, sigma)  # noqa: E731
    sum_BHW = torch.zeros(B, H, W, dtype=dtype, device=a_BCHW.device)
    for c in range(C):
        x, y = a_BCHW[:, c].to(dtype), b_BCHW[:, c].to(dtype)
        shift_B11 = ((x.mean(dim=(1, 2)) + y.mean(dim=(1, 2))) / 2)[:, None, None]
        x, y = x - shift_B11, y - shift_B11
        ux, uy = blur(x), blur(y)
        vx, vy, vxy = blur(x * x) - ux * ux, blur(y * y) - uy * uy, blur(x * y) - ux * uy
        ux, uy = ux + shift_B11, uy + shift_B11
        sum_BHW += ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return sum_BHW / C


def region_mean(map_BHW: torch.Tensor, region_BHW: torch.Tensor) -> torch.Tensor:
    """Mean of a per-pixel map over a region, image by image, in float64; NaN for an empty region. The region
    is a mask or per-pixel weights (the share of each pixel inside the region, after a resize)."""
    region = region_BHW.double()
    return (map_BHW.double() * region).sum(dim=(1, 2)) / region.sum(dim=(1, 2))


# -- bounding the size of what is scored -----------------------------------------------------------------


def bounded_size(height: int, width: int, max_pixels: int = SCORE_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) to score an image at: its own when it has at most ``max_pixels`` pixels, else the
    largest size of about the same aspect ratio within ``max_pixels`` (a side never below 1 pixel)."""
    if max_pixels < 1:
        raise ValueError(f"`max_pixels` must be >= 1 but is {max_pixels}.")
    if height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    short, long = sorted((height, width))
    new_short = max(1, int(short * scale))
    # A strip thinner than 1 pixel at that scale keeps 1 pixel and gives up its aspect ratio instead.
    new_long = min(int(long * scale), max_pixels // new_short) if short * scale >= 1 else min(long, max_pixels)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def shrink_pair(source: np.ndarray, edit: np.ndarray, mask: np.ndarray, max_pixels: int = SCORE_MAX_PIXELS):
    """A pair as SSIM and LPIPS see it: ``(source, edit, fg, bg)`` at :func:`bounded_size`. Images stay
    H x W x 3 uint8 (box-averaged, as Wang et al.'s ``ssim.m`` downsamples); ``fg`` / ``bg`` are each small
    pixel's share of the mask and of its complement (float32 in [0, 1]; the bool masks when not resized)."""
    h, w = bounded_size(*mask.shape, max_pixels)
    if (h, w) == mask.shape:
        return source, edit, mask, ~mask
    box = lambda im: im.resize((w, h), Image.Resampling.BOX)  # noqa: E731
    shares = lambda m: np.asarray(box(Image.fromarray(m.astype(np.float32), "F")))  # noqa: E731
    return np.asarray(box(Image.fromarray(source))), np.asarray(box(Image.fromarray(edit))), shares(mask), shares(~mask)


def centre_crop_aspect(image: np.ndarray, max_aspect: float = CLIP_MAX_ASPECT) -> np.ndarray:
    """The centre of an H x W x C image with its long side cut to at most ``max_aspect`` times its short side
    (a view; the cut is the same number of pixels on each side, so the crop keeps the image's centre)."""
    h, w = image.shape[:2]
    short, long = min(h, w), max(h, w)
    keep = min(long, math.ceil(max_aspect * short))
    keep += (long - keep) % 2
    start = (long - keep) // 2
    return image[start : start + keep] if h > w else image[:, start : start + keep]


def _shortest_side_transform(preprocess) -> tuple[int, int] | None:
    """(S, PIL resample) when ``preprocess`` starts as open_clip's default ('shortest') inference transform,
    torchvision's ``Resize(S)`` then ``CenterCrop(S)``; else None."""
    from torchvision import transforms as T
    from torchvision.transforms.functional import pil_modes_mapping

    steps = getattr(preprocess, "transforms", [])
    if len(steps) < 2 or type(steps[0]) is not T.Resize or type(steps[1]) is not T.CenterCrop or steps[0].max_size:
        return None
    size = steps[0].size if isinstance(steps[0].size, int) else steps[0].size[0] if len(steps[0].size) == 1 else None
    if size is None or tuple(steps[1].size) != (size, size):
        return None
    return size, pil_modes_mapping[steps[0].interpolation]


def clip_ready(image: np.ndarray, preprocess, max_aspect: float = CLIP_MAX_ASPECT) -> Image.Image:
    """An H x W x 3 uint8 image as a PIL image that ``preprocess`` (open_clip's transform) takes in bounded memory.

    Up to ``max_aspect`` : 1, the image itself. Longer, for open_clip's default transform (resize the short side
    to S, keep the centre S x S): that centre square, with torchvision's sizes and rounding, resized by PIL from
    its box of the source alone (``box=``; the filter still reads the pixels around the box), so the S x
    (S * aspect) image is never made and the transform has nothing left to do. Not bit-exact: PIL may run its two
    passes in the other order and round in between (measured: up to 17 of 255 on random noise, 0 on a 1 x 3000
    strip; CLIP scores within 0.02 on noise). For other transforms (``squash``, ``longest``), a ``max_aspect`` : 1
    centre crop, which they then see.
    """
    h, w = image.shape[:2]
    if max(h, w) <= max_aspect * min(h, w):
        return Image.fromarray(image)
    shortest = _shortest_side_transform(preprocess)
    if shortest is None:
        return Image.fromarray(np.ascontiguousarray(centre_crop_aspect(image, max_aspect)))
    size, resample = shortest
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # torchvision's Resize(size): the short side to size
    start = int(round((new_long - size) / 2.0))  # torchvision's CenterCrop(size)
    scale = long / new_long
    box = (0, start * scale, w, (start + size) * scale) if w <= h else (start * scale, 0, (start + size) * scale, h)
    return Image.fromarray(image).resize((size, size), resample, box=box)


# -- loading the models ----------------------------------------------------------------------------------


@dataclass
class ClipBundle:
    model: torch.nn.Module
    preprocess: object  # open_clip's inference transform: PIL -> C x S x S tensor
    tokenizer: object
    name: str
    weights: str  # the checkpoint file the weights came from (or the pretrained tag)


class _DropMessages(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def load_clip(clip_model: str | None, clip_weights: str | None, device: torch.device) -> tuple[ClipBundle | None, str | None]:
    """Load the CLIP that :func:`resolve_clip` finds, or return ``(None, reason)`` when the default one is not there.

    Built without weights, then loaded strictly from the one checkpoint chosen (every tensor of the model must
    come from it), or from open_clip's pretrained tag. A checkpoint that does not fit raises :class:`ScoreLoadError`.
    """
    source, reason = resolve_clip(clip_model, clip_weights)
    if source is None:
        return None, reason
    import open_clip

    if source.config is not None:
        open_clip.add_model_config(source.config)  # registered under the file's stem
    # open_clip warns "initialized randomly" when it builds a model without weights; here the weights are
    # loaded right after, strictly, so the warning would only mislead a reader of the job's log.
    quiet = _DropMessages("initialized randomly")
    logging.getLogger().addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            source.name, pretrained=source.tag, load_weights=source.tag is not None
        )
        if source.checkpoint is not None:
            open_clip.load_checkpoint(model, str(source.checkpoint), strict=True)
        tokenizer = open_clip.get_tokenizer(source.name)
    except Exception as exc:  # open_clip raises RuntimeError, ValueError, OSError, KeyError ... for a bad checkpoint
        raise ScoreLoadError(f"Could not load CLIP {source.name!r} with weights {source.weights}: {exc}") from exc
    finally:
        logging.getLogger().removeFilter(quiet)
    model.to(device).eval().requires_grad_(False)
    return ClipBundle(model, preprocess, tokenizer, source.name, source.weights), None


def _load_backbone_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # torchvision's published backbones are .pth files; weights_only=True unpickles tensors and plain
    # containers only (no code), which is what makes reading the hub cache safe.
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_lpips(net: str, weights: str | None, device: torch.device) -> tuple[torch.nn.Module | None, str | None, str | None]:
    """LPIPS with the package's own linear layers and the backbone's torchvision weights, never a download.

    Returns ``(model, weights_file, None)``, or ``(None, None, reason)`` as :func:`resolve_lpips` does. Explicit
    ``weights`` that cannot be loaded raise.
    """
    path, reason = resolve_lpips(net, weights)
    if path is None:
        return None, None, reason
    import lpips

    # pnet_rand=True builds the backbone without asking torchvision for weights (no download); the
    # package's linear layers (shipped with it, weights/v0.1/<net>.pth) load as usual.
    with warnings.catch_warnings():  # lpips 0.1.4 calls torchvision's deprecated `pretrained=` argument
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    state = _load_backbone_state(path)
    # lpips splits torchvision's ``features`` into slices but keeps each layer's index: slice2.3 = features.3.
    mapped = {}
    for key in model.net.state_dict():
        slice_name, index, param = key.split(".", 2)
        source_key = f"features.{index}.{param}"
        if source_key not in state:
            raise ScoreLoadError(f"LPIPS backbone weights {path} lack {source_key}: not torchvision's {net} weights?")
        mapped[key] = state[source_key]
    try:
        model.net.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise ScoreLoadError(f"LPIPS backbone weights {path} do not fit lpips' {net}: {exc}") from exc
    return model.to(device).eval().requires_grad_(False), str(path), None


def lpips_distance(model: torch.nn.Module, a_BCHW: torch.Tensor, b_BCHW: torch.Tensor) -> torch.Tensor:
    """``model(a, b)`` of an ``lpips.LPIPS`` (version 0.1, linear layers, spatial average) as B values, computed
    one backbone slice at a time: each layer's distance is taken as soon as its features exist and they are
    freed before the next, so the peak holds one layer of both images instead of every layer's features,
    normalised copies and differences (at a megapixel: about 100 MB instead of 250 to 900 with AlexNet)."""
    x, y = model.scaling_layer(a_BCHW), model.scaling_layer(b_BCHW)
    total = torch.zeros(a_BCHW.shape[0], dtype=a_BCHW.dtype, device=a_BCHW.device)
    for k in range(model.L):
        layer = getattr(model.net, f"slice{k + 1}")
        x, y = layer(x), layer(y)
        diff = (normalize_features(x) - normalize_features(y)).square_()
        total += model.lins[k](diff).mean(dim=(1, 2, 3))
        del diff
    return total


def normalize_features(x_BCHW: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each pixel's feature vector divided by its length (+ eps), as ``lpips.normalize_tensor``."""
    return x_BCHW / (x_BCHW.square().sum(dim=1, keepdim=True).sqrt_() + eps)


# -- what scores the edits, for run.json -----------------------------------------------------------------


# -- the scorer ------------------------------------------------------------------------------------------


def _as_rgb_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"Images must be PIL images or H x W x 3 uint8 arrays, got an array {a.shape} {a.dtype}.")
    return a


def _as_mask_array(mask) -> np.ndarray:
    if isinstance(mask, Image.Image):
        mask = mask.convert("L")
    a = np.asarray(mask)
    if a.ndim != 2:
        raise ValueError(f"Masks must be H x W (PIL 'L'/'1' or an array; nonzero = edited), got shape {a.shape}.")
    return a > 0


def mask_fraction(mask) -> float:
    """The share of a mask's pixels that are edited (nonzero): a 0/255 or bool mask, as a PIL image or an array."""
    a = _as_mask_array(mask)
    return np.count_nonzero(a) / a.size


class Scorer:
    """Loads the scoring models once; :meth:`score` scores batches of edits.

    ``unavailable`` maps each score column that will be null to the reason (for ``run.json``).
    """

    def __init__(self, config: ScoreConfig | None = None):
        self.config = config or ScoreConfig()
        self.device = resolve_device(self.config.device)
        self.clip, clip_reason = load_clip(self.config.clip_model, self.config.clip_weights, self.device)
        self.lpips, self.lpips_weights, lpips_reason = load_lpips(self.config.lpips_net, self.config.lpips_weights, self.device)
        self.unavailable: dict[str, str] = _unavailable(clip_reason, lpips_reason)
        self._fingerprints: dict[str, str] = {}

    def describe(self) -> dict:
        """What scored the edits, for ``run.json``: models, weight files and their sha256, and the reasons for nulls
        (:func:`describe_scores` says the same without loading anything)."""
        return _description(self.config, self.clip, self.lpips_weights, self.unavailable, self._sha256)

    def _sha256(self, path: str) -> str:
        if path not in self._fingerprints:
            self._fingerprints[path] = sha256_file(path)
        return self._fingerprints[path]

    def clip_input(self, image: np.ndarray) -> torch.Tensor:
        """An H x W x 3 uint8 image -> CLIP's input C x S x S, through open_clip's own inference transform (an
        image longer than :data:`CLIP_MAX_ASPECT` : 1 first through :func:`clip_ready`)."""
        return self.clip.preprocess(clip_ready(image, self.clip.preprocess))

    @torch.no_grad()
    def encode_images(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """CLIP inputs (from :meth:`clip_input`) -> L2-normalised image embeddings B x D."""
        out = []
        bs = self.config.batch_size
        for i in range(0, len(inputs), bs):
            x = torch.stack(inputs[i : i + bs]).to(self.device)
            out.append(self.clip.model.encode_image(x, normalize=True).float())
        return torch.cat(out)

    def clip_embeddings(self, images: list[np.ndarray]) -> torch.Tensor:
        """images (H x W x 3 uint8, any sizes) -> L2-normalised image embeddings B x D."""
        return self.encode_images([self.clip_input(a) for a in images])

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> L2-normalised text embeddings B x D; each distinct prompt encoded once."""
        unique = list(dict.fromkeys(prompts))
        out = []
        bs = self.config.batch_size
        for i in range(0, len(unique), bs):
            tokens = self.clip.tokenizer(unique[i : i + bs]).to(self.device)
            out.append(self.clip.model.encode_text(tokens, normalize=True).float())
        embeds = torch.cat(out)
        index = {p: i for i, p in enumerate(unique)}
        return embeds[[index[p] for p in prompts]]

    @torch.no_grad()
    def score(self, sources: list, edits: list, masks: list, source_prompts: list[str], target_prompts: list[str]) -> dict[str, list]:
        """Score B edits. Images: PIL or H x W x 3 uint8 arrays; ``edits[i]`` and ``masks[i]`` at the size of
        ``sources[i]`` (sizes may differ between pairs). Returns ``{column: [float or None] * B}`` for every
        column of :data:`SCORE_COLUMNS`."""
        B = len(sources)
        if not (len(edits) == len(masks) == len(source_prompts) == len(target_prompts) == B):
            raise ValueError(
                f"Got {B} sources, {len(edits)} edits, {len(masks)} masks, {len(source_prompts)} source prompts and "
                f"{len(target_prompts)} target prompts; they must be equal."
            )
        out: dict[str, list] = {c: [None] * B for c in SCORE_COLUMNS}
        if B == 0:
            return out

        # 1. One pair at a time at full size (only one pair's full-size arrays exist at once): exact PSNR and
        #    mask fraction, CLIP's inputs, and the pair at the bounded size SSIM and LPIPS see.
        clip_src, clip_edt, small = [], [], []
        for i in range(B):
            s, e, m = _as_rgb_array(sources[i]), _as_rgb_array(edits[i]), _as_mask_array(masks[i])
            if s.shape != e.shape or s.shape[:2] != m.shape:
                raise ValueError(f"Pair {i}: source {s.shape[:2]}, edit {e.shape[:2]} and mask {m.shape} must have one size.")
            self._full_size_scores(s, e, m, i, out)
            if self.clip is not None:
                clip_src.append(self.clip_input(s))
                clip_edt.append(self.clip_input(e))
            small.append(shrink_pair(s, e, m, self.config.max_pixels))
            del s, e, m

        # 2. CLIP: image and text embeddings, then the four similarities.
        if self.clip is not None:
            self._clip_scores(clip_src, clip_edt, source_prompts, target_prompts, out)

        # 3. SSIM and LPIPS at the bounded size, on groups of same-size pairs, at most max_pixels pixels per
        #    forward pass, in [0, 1] (LPIPS takes [-1, 1]).
        for shape, members in _same_size_groups(small).items():
            n = min(self.config.batch_size, max(1, self.config.max_pixels // (shape[0] * shape[1])))
            for j in range(0, len(members), n):
                self._bounded_scores([small[i] for i in members[j : j + n]], members[j : j + n], out)
        return out

    def _full_size_scores(self, s: np.ndarray, e: np.ndarray, m: np.ndarray, i: int, out: dict[str, list]) -> None:
        """Pair i's exact PSNR inside and outside the mask, and its mask fraction, into ``out``."""
        a, b = (_view(x).to(self.device).permute(2, 0, 1)[None] for x in (s, e))
        inside, total = squared_error_sums(a, b, _view(m).to(self.device)[None])
        n_fg, channels = int(m.sum()), s.shape[2]
        out["psnr_fg"][i] = _number(psnr(inside, channels * n_fg, data_range=255))
        out["psnr_bg"][i] = _number(psnr(total - inside, channels * (m.size - n_fg), data_range=255))
        out["mask_fraction"][i] = mask_fraction(m)

    def _clip_scores(self, clip_src: list[torch.Tensor], clip_edt: list[torch.Tensor], source_prompts: list[str],
                     target_prompts: list[str], out: dict[str, list]) -> None:
        """The four CLIP columns of every pair into ``out``, from CLIP's inputs and the prompts."""
        src_img, edt_img = self.encode_images(clip_src + clip_edt).chunk(2)
        src_txt, tgt_txt = self.text_embeddings(list(source_prompts) + list(target_prompts)).chunk(2)
        columns = {
            "clip_source": cosine(edt_img, src_txt),
            "clip_target": cosine(edt_img, tgt_txt),
            "clip_directional": directional_similarity(src_img, edt_img, src_txt, tgt_txt),
            "clip_image": cosine(src_img, edt_img),
        }
        for name, values in columns.items():
            out[name] = [float(v) for v in values.cpu()]

    def _bounded_scores(self, pairs: list[tuple], idx: list[int], out: dict[str, list]) -> None:
        """SSIM (and LPIPS) of one forward pass of same-size pairs from :func:`shrink_pair` into ``out`` at ``idx``."""
        shape = pairs[0][0].shape
        stack = lambda k: torch.from_numpy(np.stack([p[k] for p in pairs])).to(self.device)  # noqa: E731
        a, b = (stack(k).permute(0, 3, 1, 2).float() / 255 for k in (0, 1))
        fg, bg = stack(2), stack(3)
        ssim = ssim_map(a, b)
        values = {"ssim_bg": region_mean(ssim, bg), "ssim_fg": region_mean(ssim, fg)}
        del ssim
        if self.lpips is not None and min(shape[:2]) >= LPIPS_MIN_SIDE:
            values["lpips"] = lpips_distance(self.lpips, a * 2 - 1, b * 2 - 1)
        for name, column in values.items():
            for i, v in zip(idx, column.cpu().tolist()):
                out[name][i] = _number(v)


def _same_size_groups(small: list[tuple]) -> dict[tuple, list[int]]:
    """The indices of the shrunk pairs, grouped by their size (H x W x 3), in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, (s, _, _, _) in enumerate(small):
        groups.setdefault(s.shape, []).append(i)
    return groups


def _view(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing an array's memory (PIL's arrays are read-only; nothing here writes to them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def _number(value) -> float | None:
    """A score as a plain float; None (null) for NaN, i.e. an empty region."""
    value = float(value)
    return None if missing(value) else value
