"""The three DiffEdit steps fused over a batch, and the Python API a notebook uses.

    editor = diffedit.load("path/to/sd-folder")          # or a hub id; default: the shipped model
    results = editor.edit(images, ["a red circle"], ["a blue circle"])
    results[0].image, results[0].mask, results[0].soft_map

Each image of a batch has its own prompt pair and its own seed (derived from the global seed, its key
and its edit index), so a result never depends on the batch it was computed in.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import EditConfig
from .decode import masked_decode
from .encode import Trajectory, invert, noise_encode
from .composite import changed_outside, composite, edit_region
from .frame import bucket_size, check_size, fit_box
from .images import RESAMPLE, fit_images, fit_masks, to_rgb, to_uint8, unfit
from .mask import infer_mask, latent_mask_from_image
from .model import DiffEditModel, load_model
from .randomness import edit_seed, per_image_noise
from .scores import mask_fraction
from .sources import SHIPPED_MODEL
from .text import Text



@dataclass
class BatchOutput:
    edited_BCHW: torch.Tensor  # float32 in [-1, 1], at the edit size
    mask_Bhw: torch.Tensor  # bool, latent resolution (inferred, or the user's mask pooled to the latent grid)
    soft_Bhw: torch.Tensor  # float32 in [0, 1]; for a user mask, the mask itself as 0/1
    inferred: list[bool]  # False where the user supplied the mask
    latents_BChw: torch.Tensor  # the decoded (edited) latents
    trajectory: Trajectory | None = None  # the encoded latents, when asked for


def edit_batch(
    model: DiffEditModel,
    images_BCHW: torch.Tensor,
    source_prompts: list[str],
    target_prompts: list[str],
    seeds: list[int],
    config: EditConfig = EditConfig(),
    masks: list[torch.Tensor | None] | None = None,
    keep_trajectory: bool = False,
) -> BatchOutput:
    """Mask inference -> encoding (inversion) -> masked decoding for B images, fused on ``model.device``.

    ``images_BCHW``: [-1, 1], sides multiples of ``model.size_multiple`` (:func:`edit_images` takes any image);
    ``masks[i]``, a bool mask at that size, skips mask inference for image i. ``model.max_batch`` caps the
    denoiser's calls.
    """
    _check_batch(model, images_BCHW, source_prompts, target_prompts, seeds, masks)
    masks = masks if masks is not None else [None] * images_BCHW.shape[0]

    # 1. Encode the images once (posterior mean) and every distinct prompt once.
    latents_BChw = model.encode_images(images_BCHW)
    prompts = _encode_prompts(model, source_prompts, target_prompts, config.decode.negative_prompt)

    # 2. The mask: inferred (DiffEdit step 1) where the user gave none.
    mask_Bhw, soft_Bhw = _batch_masks(model, latents_BChw, prompts, seeds, masks, config)

    # 3. Encoding to ratio r (DDIM or flow inversion): unconditional (the paper) or under the source prompt; or, as the
    #    paper's ablation, plain noising with a draw of each edit's own derived generator.
    trajectory = _encode_latents(model, latents_BChw, prompts, seeds, config)

    # 4. Masked decoding under the target prompt, with classifier-free (or FLUX.1-dev's embedded) guidance.
    edited_BChw = masked_decode(model, trajectory, mask_Bhw, prompts.target, prompts.negative,
                                guidance=config.decode.guidance, num_steps=config.encode.num_steps,
                                shift=config.encode.shift, solver=config.encode.solver,
                                cache_interval=config.decode.cache_interval)
    return BatchOutput(edited_BCHW=model.decode_latents(edited_BChw), mask_Bhw=mask_Bhw, soft_Bhw=soft_Bhw,
                       inferred=[m is None for m in masks], latents_BChw=edited_BChw,
                       trajectory=trajectory if keep_trajectory else None)


def _check_batch(model: DiffEditModel, images_BCHW: torch.Tensor, source_prompts: list[str],
                 target_prompts: list[str], seeds: list[int], masks: list | None) -> None:
    """Raise early unless there is one prompt pair, seed (and mask, if any) per image, at a size the model takes."""
    B = images_BCHW.shape[0]
    if not (len(source_prompts) == len(target_prompts) == len(seeds) == B):
        raise ValueError(
            f"Got {B} images, {len(source_prompts)} source prompts, {len(target_prompts)} target prompts "
            f"and {len(seeds)} seeds; they must be equal."
        )
    if masks is not None and len(masks) != B:
        raise ValueError(f"Got {B} images but {len(masks)} masks; pass None for images without a mask.")
    m, shape = model.size_multiple, tuple(images_BCHW.shape)
    if len(shape) != 4 or shape[1] != 3 or shape[2] % m or shape[3] % m:
        raise ValueError(f"`images_BCHW` must be B x 3 x H x W with H and W multiples of {m} but is {shape}.")


@dataclass
class _Prompts:
    """The text conditioning of one batch (stages.text.Text), B rows each."""

    source: Text
    target: Text
    negative: Text  # the negative prompt of classifier-free guidance, for every image
    empty: Text  # the empty prompt (unconditional), for every image


def _encode_prompts(model: DiffEditModel, source_prompts: list[str], target_prompts: list[str],
                    negative: str) -> _Prompts:
    """Encode the source, target, negative and empty prompts in one text-encoder call (each distinct one once)."""
    B = len(source_prompts)
    text = model.encode_text(list(source_prompts) + list(target_prompts) + [negative, ""])
    return _Prompts(source=text[:B], target=text[B : 2 * B], negative=text[2 * B : 2 * B + 1].expand(B),
                    empty=text[2 * B + 1 :].expand(B))


def _batch_masks(model: DiffEditModel, latents_BChw: torch.Tensor, prompts: _Prompts, seeds: list[int],
                 masks: list[torch.Tensor | None], config: EditConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask_Bhw, soft_Bhw) at latent resolution: inferred where ``masks[i]`` is None, else the user's mask pooled."""
    B, latent_hw = latents_BChw.shape[0], tuple(latents_BChw.shape[-2:])
    mask_Bhw = torch.zeros(B, *latent_hw, dtype=torch.bool, device=model.device)
    soft_Bhw = torch.zeros(B, *latent_hw, dtype=torch.float32, device=model.device)
    todo = [i for i, m in enumerate(masks) if m is None]
    if todo:
        noise = per_image_noise([seeds[i] for i in todo], (config.mask.num_samples, *latents_BChw.shape[1:]))
        inferred = infer_mask(
            model, latents_BChw[todo], prompts.source[todo], prompts.target[todo], noise,
            config.mask, num_steps=config.encode.num_steps, guidance=config.decode.guidance, shift=config.encode.shift,
        )
        mask_Bhw[todo], soft_Bhw[todo] = inferred.mask_Bhw, inferred.soft_Bhw
    given = [i for i, m in enumerate(masks) if m is not None]
    if given:
        pooled = latent_mask_from_image(torch.stack([masks[i] for i in given]).to(model.device), latent_hw)
        mask_Bhw[given], soft_Bhw[given] = pooled, pooled.float()
    return mask_Bhw, soft_Bhw


def _encode_latents(model: DiffEditModel, latents_BChw: torch.Tensor, prompts: _Prompts, seeds: list[int],
                    config: EditConfig) -> Trajectory:
    """Encode the latents to ratio r: the trajectory that masked decoding starts from."""
    if config.encode.method == "noise":
        noise_BChw = per_image_noise([edit_seed(s, "encode") for s in seeds], tuple(latents_BChw.shape[1:]))
        return noise_encode(model, latents_BChw, noise_BChw, config.encode)
    text = prompts.source if config.encode.conditional else prompts.empty
    return invert(model, latents_BChw, text, config.encode, uncond=prompts.empty)


@dataclass
class ImageEdit:
    """One edit back at its image's own size (what :func:`edit_images` returns per image)."""

    image: np.ndarray  # H x W x 3 uint8: the source with the edit composited in, or the whole decode
    mask: np.ndarray  # H x W bool: the mask at the image's resolution
    region: np.ndarray  # H x W bool: the mask and its feathered band (stages.composite.edit_region)
    edit_size: tuple[int, int]  # (width, height) the model edited at
    feather: int  # the band's width in the image's pixels (FrameConfig.feather_px)
    bg_changed_pixels: int  # pixels outside ``region`` that differ from the source (0 with composite "mask")
    inferred: bool  # False where the user supplied the mask
    soft_hw: np.ndarray  # float32 h x w at latent resolution, in [0, 1]
    mask_hw: np.ndarray  # bool h x w
    latents: torch.Tensor | None = None  # edited latents C x h x w (with keep_latents)


def edit_size(model: DiffEditModel, width: int, height: int, frame) -> tuple[int, int]:
    """The (width, height) an image is edited at: ``--resolution`` if forced, else its aspect-ratio bucket."""
    return frame.forced_size or bucket_size(width, height, model.resolution, model.size_multiple)


def check_frame(model: DiffEditModel, frame) -> None:
    """Raise ValueError unless a forced ``--resolution`` suits the model (each side a multiple of its need)."""
    if frame.forced_size is not None:
        check_size(frame.forced_size, model.size_multiple)


def edit_images(model: DiffEditModel, images: list[Image.Image], source_prompts: list[str], target_prompts: list[str],
                seeds: list[int], config: EditConfig, masks: list | None = None, *, pad_to: int | None = None,
                lock=None, keep_latents: bool = False) -> list[ImageEdit]:
    """Edit PIL images of any sizes, each at its edit size (images of one size share model batches), and bring
    each edit back to its image's own size: composited onto the source (``config.frame.composite``).

    ``pad_to`` pads each model batch to that many rows (a compiled model then sees one shape per edit size);
    ``lock`` (a context manager) is held around the model's work only.
    """
    check_frame(model, config.frame)
    rgbs = [to_rgb(im) for im in images]
    masks = masks if masks is not None else [None] * len(rgbs)
    sizes = [edit_size(model, *im.size, config.frame) for im in rgbs]
    out: list[ImageEdit | None] = [None] * len(rgbs)
    for size in dict.fromkeys(sizes):
        idx = [i for i, s in enumerate(sizes) if s == size]
        group = _edit_at(model, size, [rgbs[i] for i in idx], [source_prompts[i] for i in idx],
                         [target_prompts[i] for i in idx], [seeds[i] for i in idx], config, [masks[i] for i in idx],
                         pad_to, lock or contextlib.nullcontext(), keep_latents)
        for i, result in zip(idx, group):
            out[i] = result
    return out


def _edit_at(model: DiffEditModel, size: tuple[int, int], rgbs: list[Image.Image], sources: list[str],
             targets: list[str], seeds: list[int], config: EditConfig, masks: list, pad_to: int | None, lock,
             keep_latents: bool) -> list[ImageEdit]:
    """One model batch at edit ``size`` (padded to ``pad_to`` rows by repeating its last), then each row back."""
    n = len(rgbs)
    pad = max(0, (pad_to or 0) - n)
    user = [None if m is None else fit_masks([m], size, [rgb.size])[0] for m, rgb in zip(masks, rgbs)]
    with lock:
        out = edit_batch(model, fit_images(rgbs + rgbs[-1:] * pad, size).to(model.device), sources + sources[-1:] * pad,
                         targets + targets[-1:] * pad, seeds + seeds[-1:] * pad, config, masks=user + user[-1:] * pad)
        decoded = to_uint8(out.edited_BCHW[:n])
        mask_hw, soft_hw = out.mask_Bhw[:n].cpu().numpy(), out.soft_Bhw[:n].float().cpu().numpy()
        latents = out.latents_BChw[:n].float().cpu() if keep_latents else None
        del out
    return [_back(rgb, decoded[i], mask_hw[i], soft_hw[i], size, config, user[i] is None,
                  None if latents is None else latents[i]) for i, rgb in enumerate(rgbs)]


def _back(rgb: Image.Image, decoded: np.ndarray, mask_hw: np.ndarray, soft_hw: np.ndarray, size: tuple[int, int],
          config: EditConfig, inferred: bool, latents: torch.Tensor | None) -> ImageEdit:
    """One decoded edit at ``size`` -> its image's own size, composited (or not), with its mask and region."""
    source = np.asarray(rgb)
    cell = size[1] // mask_hw.shape[0]  # pixels per latent cell
    mask_px = np.kron(mask_hw.astype(np.uint8), np.ones((cell, cell), np.uint8))
    mask = unfit(mask_px, rgb.size, Image.Resampling.NEAREST) > 0
    edit = unfit(decoded, rgb.size, RESAMPLE)
    frame = config.frame
    feather = frame.feather_px(rgb.width, fit_box(*rgb.size, size)[2], cell)
    region = edit_region(mask, feather)
    image = composite(source, edit, mask, feather) if frame.composite == "mask" else edit
    return ImageEdit(image=image, mask=mask, region=region, edit_size=size, feather=feather,
                     bg_changed_pixels=changed_outside(source, image, region), inferred=inferred, soft_hw=soft_hw,
                     mask_hw=mask_hw, latents=latents)


@dataclass
class EditResult:
    """One edit, at the input image's own size."""

    image: Image.Image  # the edited image (RGB, original width x height)
    source: Image.Image  # the image it was made from (upright RGB): equal to ``image`` outside ``region``
    mask: Image.Image  # the mask used ('L', 0/255, original size)
    region: np.ndarray  # bool H x W: the mask and its feathered band (stages.composite.edit_region)
    soft_map: np.ndarray  # float32 h x w at latent resolution, in [0, 1]
    mask_latent: np.ndarray  # bool h x w
    mask_inferred: bool
    seed: int  # the per-edit seed actually used
    source_prompt: str
    target_prompt: str
    edit_size: tuple[int, int]  # (width, height) the model edited at
    feather: int  # the band's width in the image's pixels
    bg_changed_pixels: int  # pixels outside ``region`` that differ from ``source`` (0 with composite "mask")
    latents: torch.Tensor | None = None  # edited latents C x h x w (with keep_latents=True)

    @property
    def mask_fraction(self) -> float:
        return mask_fraction(self.mask)


def image_key(image: Image.Image) -> str:
    """A content key for an image without one: the same picture gets the same noise wherever it is."""
    rgb = to_rgb(image)
    return hashlib.sha1(rgb.tobytes() + repr(rgb.size).encode()).hexdigest()


class DiffEditor:
    """A loaded model and an :class:`EditConfig`; edits lists of PIL images in batches."""

    def __init__(self, model: DiffEditModel, config: EditConfig | None = None, batch_size: int = 8):
        self.model = model
        self.config = config or EditConfig.from_flat(model.recommended)
        self.batch_size = batch_size

    def edit(
        self,
        images: list[Image.Image],
        source_prompts: list[str] | str,
        target_prompts: list[str] | str,
        *,
        keys: list[str] | None = None,
        seed: int = 0,
        edit_indices: list[int] | None = None,
        masks: list | None = None,
        keep_latents: bool = False,
    ) -> list[EditResult]:
        """Edit ``images``; a single string prompt applies to every image.

        ``keys`` name the samples (default: a hash of each image's pixels); with ``seed`` and
        ``edit_indices`` they fix each edit's noise. ``masks`` (PIL or arrays, nonzero = edit; None
        entries allowed) skip mask inference for those images. Each image is edited at its aspect ratio's
        edit size and comes back at its own size (``config.frame``).
        """
        # 1. One prompt pair, key, edit index and mask (or None) per image.
        if isinstance(images, Image.Image):
            images = [images]
        sources, targets, keys, edit_indices, masks = _per_image(
            images, source_prompts, target_prompts, keys, edit_indices, masks
        )
        # 2. Each image's seed from (seed, key, edit index), then the edits, batch by batch.
        seeds = [edit_seed(seed, k, e) for k, e in zip(keys, edit_indices)]
        results: list[EditResult] = []
        for start in range(0, len(images), self.batch_size):
            sl = slice(start, start + self.batch_size)
            edits = edit_images(self.model, images[sl], sources[sl], targets[sl], seeds[sl], self.config, masks[sl],
                                keep_latents=keep_latents)
            results += [_result(im, e, s, src, tgt) for im, e, s, src, tgt
                        in zip(images[sl], edits, seeds[sl], sources[sl], targets[sl])]
        return results


def _result(image: Image.Image, e: ImageEdit, seed: int, source_prompt: str, target_prompt: str) -> EditResult:
    return EditResult(image=Image.fromarray(e.image), source=to_rgb(image), mask=Image.fromarray(e.mask.astype(np.uint8) * 255, "L"),
                      region=e.region, soft_map=e.soft_hw, mask_latent=e.mask_hw, mask_inferred=e.inferred, seed=seed,
                      source_prompt=source_prompt, target_prompt=target_prompt, edit_size=e.edit_size, feather=e.feather,
                      bg_changed_pixels=e.bg_changed_pixels, latents=e.latents)


def _per_image(images: list[Image.Image], source_prompts: list[str] | str, target_prompts: list[str] | str,
               keys: list[str] | None, edit_indices: list[int] | None, masks: list | None) -> tuple[list, ...]:
    """(sources, targets, keys, edit_indices, masks) as lists of one entry per image; raises on any other length."""
    n = len(images)
    sources = [source_prompts] * n if isinstance(source_prompts, str) else list(source_prompts)
    targets = [target_prompts] * n if isinstance(target_prompts, str) else list(target_prompts)
    keys = [image_key(im) for im in images] if keys is None else list(keys)
    edit_indices = [0] * n if edit_indices is None else list(edit_indices)
    masks = [None] * n if masks is None else list(masks)
    for name, values in (("source_prompts", sources), ("target_prompts", targets), ("keys", keys),
                         ("edit_indices", edit_indices), ("masks", masks)):
        if len(values) != n:
            raise ValueError(f"Got {n} images but {len(values)} {name}.")
    return sources, targets, keys, edit_indices, masks


def load(model: str | Path | None = None, *, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
         **params) -> DiffEditor:
    """Load a model (default: the shipped shapes model) and return a :class:`DiffEditor`.

    ``params`` are edit parameters by their CLI names (``guidance=3.0``, ``encode_ratio=0.7``, ...); they
    override the model folder's recommended defaults (``diffedit.json``), which override the paper's.
    """
    if model is None:
        if not SHIPPED_MODEL.is_dir():
            raise FileNotFoundError(f"The shipped model is not at {SHIPPED_MODEL}; pass a model folder or hub id.")
        model = SHIPPED_MODEL
    loaded = load_model(model, device=device, dtype=dtype)
    config = EditConfig.from_flat(loaded.recommended, **params)
    return DiffEditor(loaded, config, batch_size=batch_size)
