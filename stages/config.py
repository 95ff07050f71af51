"""Typed configs of the three DiffEdit steps, with the paper's defaults.

Couairon et al., "DiffEdit: Diffusion-based semantic image editing with mask guidance", ICLR 2023
(arXiv:2210.11427). Section numbers below refer to that paper.

The CLI and ``run.json`` use a flat view of these configs (:meth:`EditConfig.flat`), whose keys are the
CLI option names (``--encode-ratio`` <-> ``encode_ratio``), each declared once, with its help, on its field
(:func:`option`); a model folder's ``diffedit.json`` may recommend values for the same keys.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, field, fields


def option(default, help: str, *, flag: str | None = None, choices: tuple | None = None, aliases: tuple = ()):
    """A config field that the command line offers as ``--flag`` (default: the field's name; ``aliases`` such as
    ``-v`` too), with ``help``; ``pipelines/cli.py`` generates the flags from these fields."""
    return field(default=default, metadata=dict(help=help, flag=flag, choices=choices, aliases=aliases))


def flag_name(f) -> str:
    """The option name of a config field (underscores; the flag is ``--`` + it with dashes)."""
    return f.metadata.get("flag") or f.name


def check(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless ok: the configs' validation."""
    if not ok:
        raise ValueError(message)


SOLVERS = ("ddim", "dpm")  # stages/schedules.py walks the levels with each


def check_solver(solver: str) -> None:
    check(solver in SOLVERS, f"`solver` must be one of {', '.join(SOLVERS)} but is {solver!r}.")


def check_interval(k, name: str) -> int:
    """``k`` as an int, if it is an integer >= 1 (NumPy's too; not a bool, a float or a string)."""
    check(isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1,
          f"`{name}` must be an integer >= 1 but is {k!r}.")
    return int(k)


@dataclass(frozen=True)
class MaskConfig:
    """Step 1, mask inference (Section 3.2)."""

    # The paper averages n = 10 noise draws, at 50% of the schedule, and binarises at 0.5.
    num_samples: int = option(10, "noise samples n averaged for the mask (paper: 10)", flag="mask_samples")
    strength: float = option(0.5, "noise strength for mask inference (paper: 0.5)", flag="mask_strength")
    clip_ratio: float = option(3.0, "mask map values above this x the image's mean are clipped (extremes removed)")
    threshold: float = option(0.5, "binarisation threshold of the [0, 1] mask map (paper: 0.5)")

    def __post_init__(self):
        check(self.num_samples >= 1, f"`mask_samples` must be >= 1 but is {self.num_samples}.")
        check(0.0 < self.strength <= 1.0, f"`mask_strength` must be in (0, 1] but is {self.strength}.")
        check(self.clip_ratio > 0, f"`clip_ratio` must be positive but is {self.clip_ratio}.")
        check(0.0 <= self.threshold < 1.0, f"`threshold` must be in [0, 1) but is {self.threshold}.")


@dataclass(frozen=True)
class EncodeConfig:
    """Step 2, DDIM encoding to ratio r (Section 3.2, "encoding ratio")."""

    num_steps: int = option(50, "DDIM steps of the full schedule, T (paper: 50)", flag="steps")
    encode_ratio: float = option(0.8, "encoding ratio r: DDIM-encode int(T*r) steps (paper: 0.8, Fig. 4's trade-off)")
    # The paper encodes with the unconditional model. diffusers' pipeline inverts under the source prompt
    # with guidance 7.5 instead; `conditional=True` (+ `encode_guidance`) reproduces that.
    conditional: bool = option(False, "encode under the source prompt instead of unconditionally (the paper's "
                                      "choice)", flag="conditional_encoding")
    guidance: float = option(1.0, "guidance during conditional encoding (diffusers' pipeline uses 7.5)",
                             flag="encode_guidance")
    # "ddim": the paper's DDIM encoding. "noise": the ablation the paper compares it with (SDEdit's
    # noising): every kept level is a draw of q(x_t | x_0) instead of a DDIM-inverted latent.
    method: str = option("ddim", "ddim (the paper's encoding) or noise (its ablation: plain noising, as SDEdit)",
                         flag="encode_method", choices=("ddim", "noise"))
    # Rectified-flow families only (SD3, FLUX.1): the shift of their sigma schedule, for the mask, encoding and
    # decoding alike. None: the model's scheduler config (SD3: 3.0; FLUX.1: its resolution-dependent shift).
    shift: float | None = option(None, "rectified-flow models (SD3, FLUX.1) only: the sigma schedule's shift, in "
                                       "place of the model's own (SD3: 3.0; FLUX.1-dev: by resolution)")
    # Diffusion families (SD, SDXL) only: how encoding and decoding walk the levels. DPM-Solver++(2M) adds a
    # second-order multistep correction to each DDIM step (stages/schedules.py), for fewer --steps.
    solver: str = option("ddim", "diffusion models (SD, SDXL) only: ddim (the paper's) or dpm (DPM-Solver++(2M) "
                                 "over the same levels, both ways: for fewer --steps)", choices=SOLVERS)
    # DeepCache (stages/reuse.py): the UNet in full every k-th encoding step, its deep features reused in between.
    cache_interval: int = option(1, "UNet models only: run the whole UNet every K-th encoding step and reuse its "
                                    "deep features in between (DeepCache; 1: off)", flag="encode_cache_interval")

    def __post_init__(self):
        check(self.num_steps >= 1, f"`steps` must be >= 1 but is {self.num_steps}.")
        check(0.0 < self.encode_ratio <= 1.0, f"`encode_ratio` must be in (0, 1] but is {self.encode_ratio}.")
        check(
            int(self.num_steps * self.encode_ratio) >= 1,
            f"`steps` x `encode_ratio` must give at least one step, but {self.num_steps} x {self.encode_ratio} does not.",
        )
        check(self.guidance >= 1.0, f"`encode_guidance` must be >= 1 but is {self.guidance}.")
        check(self.shift is None or self.shift > 0, f"`shift` must be > 0 but is {self.shift}.")
        check(self.method in ("ddim", "noise"), f"`encode_method` must be ddim or noise but is {self.method!r}.")
        check_solver(self.solver)
        object.__setattr__(self, "cache_interval", check_interval(self.cache_interval, "encode_cache_interval"))
        check(
            self.conditional or self.guidance == 1.0,
            "`encode_guidance` > 1 needs conditional encoding (`conditional_encoding=True`).",
        )

    @property
    def num_encode_steps(self) -> int:
        """Number of DDIM steps actually run: int(T * r), as in diffusers' strength handling."""
        return min(int(self.num_steps * self.encode_ratio), self.num_steps)


@dataclass(frozen=True)
class DecodeConfig:
    """Step 3, masked DDIM decoding under the target prompt (Section 3.2, "mask-wise correction")."""

    guidance: float = option(7.5, "classifier-free guidance scale for decoding (paper: 7.5, Stable Diffusion's)")
    negative_prompt: str = option("", "negative (unconditional) text of guidance during decoding")
    cache_interval: int = option(1, "UNet models only: run the whole UNet every K-th decoding step and reuse its deep "
                                    "features in between (DeepCache; 1: off)")

    def __post_init__(self):
        check(self.guidance >= 1.0, f"`guidance` must be >= 1 but is {self.guidance}.")
        object.__setattr__(self, "cache_interval", check_interval(self.cache_interval, "cache_interval"))


# --resolution: "auto", or a forced edit size "N" (N x N) or "WxH", each side a positive integer.
_SIZE = re.compile(r"^(?:auto|[1-9][0-9]{0,5}(?:x[1-9][0-9]{0,5})?)$")
COMPOSITES = ("mask", "none")
MAX_FEATHER = 1024


@dataclass(frozen=True)
class FrameConfig:
    """Where the model edits an image and how the edit returns to it (stages/images.py, stages/composite.py)."""

    # auto: the model's pixel budget at the aspect-ratio bucket that holds the image largest (stages.frame.bucket_size).
    resolution: str = option("auto", "size the model edits at: auto (its pixel budget, at the aspect-ratio bucket "
                                     "nearest the image's), N (N x N) or WxH; the image is fitted inside with its "
                                     "aspect ratio kept (reflected borders), never stretched")
    # The paper keeps the background by masked decoding in latent space; the VAE still redraws every pixel. Here
    # the final image is the source outside the mask (and a feathered band around it), pixel for pixel.
    composite: str = option("mask", "mask: the source image, at its own resolution, outside the edit mask and its "
                                    "feathered band; none: the whole decoded image (every pixel redrawn)",
                            choices=COMPOSITES)
    # None: two latent cells, in the image's pixels (16 px for a 512 x 512 image on Stable Diffusion): the mask is
    # drawn on the latent grid and the decoder draws an object up to about a cell past it (docs/QUALITY.md).
    feather: int | None = option(None, "width in pixels (at the image's resolution) of the band outside the mask over "
                                       "which the edit fades into the source (default: two latent cells, e.g. 16 px "
                                       "for a 512 x 512 image on Stable Diffusion)")

    def __post_init__(self):
        if isinstance(self.resolution, int) and not isinstance(self.resolution, bool):
            object.__setattr__(self, "resolution", str(self.resolution))  # resolution=512 from Python
        check(isinstance(self.resolution, str) and bool(_SIZE.match(self.resolution)),
              f"`resolution` must be auto, N or WxH (e.g. 512 or 768x512) but is {self.resolution!r}.")
        check(self.composite in COMPOSITES, f"`composite` must be mask or none but is {self.composite!r}.")
        check(self.feather is None or (isinstance(self.feather, int) and 0 <= self.feather <= MAX_FEATHER),
              f"`feather` must be an integer from 0 to {MAX_FEATHER} (pixels) but is {self.feather!r}.")

    def feather_px(self, image_width: int, fitted_width: int, cell: int) -> int:
        """The band's width in the image's pixels: ``feather``, else two latent cells of ``cell`` edit-size pixels
        seen at the image's scale (the image is ``fitted_width`` wide in the edit)."""
        if self.feather is not None:
            return self.feather
        return min(MAX_FEATHER, max(1, round(2 * cell * image_width / fitted_width)))

    @property
    def forced_size(self) -> tuple[int, int] | None:
        """(width, height) given by --resolution, or None for auto."""
        if self.resolution == "auto":
            return None
        w, _, h = self.resolution.partition("x")
        return int(w), int(h or w)


@dataclass(frozen=True)
class EditConfig:
    """All parameters that change an edit's pixels. Two runs with equal configs give equal edits."""

    mask: MaskConfig = field(default_factory=MaskConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    frame: FrameConfig = field(default_factory=FrameConfig)

    def flat(self) -> dict:
        return {key: getattr(getattr(self, part), name) for key, (part, name) in _FLAT.items()}

    @classmethod
    def from_flat(cls, values: dict | None = None, **overrides) -> "EditConfig":
        """Build from flat keys; unknown keys raise. ``None`` values mean "keep the default"."""
        merged = {**(values or {}), **{k: v for k, v in overrides.items() if v is not None}}
        unknown = sorted(set(merged) - set(_FLAT))
        if unknown:
            raise ValueError(f"Unknown edit parameter(s) {unknown}; known: {sorted(_FLAT)}.")
        parts: dict[str, dict] = {part: {} for part in STEPS}
        for key, value in merged.items():
            if value is not None:
                part, name = _FLAT[key]
                parts[part][name] = value
        return cls(**{part: STEPS[part](**values) for part, values in parts.items()})

    def replace(self, **flat_overrides) -> "EditConfig":
        return EditConfig.from_flat({**self.flat(), **flat_overrides})


STEPS = {"mask": MaskConfig, "encode": EncodeConfig, "decode": DecodeConfig, "frame": FrameConfig}
# Flat keys (CLI option names with underscores) -> (component, field), from the fields' own declarations.
_FLAT = {flag_name(f): (part, f.name) for part, cls in STEPS.items() for f in fields(cls)}
FLAT_KEYS = tuple(_FLAT)



# The lpips package's backbones: torchvision's ImageNet weights, by their file names in torch hub's cache.
LPIPS_BACKBONES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth"}
# SSIM and LPIPS see at most this many pixels per image (larger pairs are box-averaged down), and one forward
# pass at most this many pixels in all. 1024 x 1024: 512 x 512 (SD 1.5) and 1024 x 1024 (SDXL) pairs keep
# their own size, and a 12-megapixel photo scores in ~400 MB above the loaded models (bench/score_memory.py).
SCORE_MAX_PIXELS = 1024 * 1024


@dataclass(frozen=True)
class ScoreConfig:
    """Which models score the edits (stages/scores.py). Defaults: the shipped shapes CLIP, LPIPS-Alex (the LPIPS
    paper's default)."""

    clip_model: str | None = option(None, "open_clip architecture name (ViT-B-32) or model folder (default: the "
                                          "shipped shapes CLIP)")
    clip_weights: str | None = option(None, "local CLIP checkpoint (.safetensors) for --clip-model")
    lpips_net: str = option("alex", "the LPIPS backbone", choices=tuple(LPIPS_BACKBONES))
    lpips_weights: str | None = option(None, "LPIPS backbone weights (torchvision); default: torch hub's cache, "
                                             "else the lpips column is null")
    device: str = "auto"
    batch_size: int = 32  # images per CLIP / LPIPS forward pass
    max_pixels: int = SCORE_MAX_PIXELS

    def __post_init__(self):
        check(self.lpips_net in LPIPS_BACKBONES,
               f"`lpips_net` must be one of {', '.join(LPIPS_BACKBONES)} but is {self.lpips_net!r}.")
        check(self.batch_size >= 1, f"`batch_size` must be >= 1 but is {self.batch_size}.")
        check(self.max_pixels >= 1, f"`max_pixels` must be >= 1 but is {self.max_pixels}.")
