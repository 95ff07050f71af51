"""Typed configs of the three DiffEdit steps, with the paper's defaults.

Couairon et al., "DiffEdit: Diffusion-based semantic image editing with mask guidance", ICLR 2023
(arXiv:2210.11427). Section numbers below refer to that paper.

The CLI and ``run.json`` use a flat view of these configs (:meth:`EditConfig.flat`), whose keys are the
CLI option names (``--encode-ratio`` <-> ``encode_ratio``); a model folder's ``diffedit.json`` may
recommend values for the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class MaskConfig:
    """Step 1, mask inference (Section 3.2)."""

    num_samples: int = 10  # n noisy copies per image; the paper averages n = 10 noise draws.
    strength: float = 0.5  # noise added to the image latents: 50% of the schedule, as in the paper.
    clip_ratio: float = 3.0  # values above clip_ratio x the image's mean difference are clipped (extremes removed).
    threshold: float = 0.5  # binarisation threshold of the [0, 1] map; the paper uses 0.5.

    def __post_init__(self):
        _check(self.num_samples >= 1, f"`mask_samples` must be >= 1 but is {self.num_samples}.")
        _check(0.0 < self.strength <= 1.0, f"`mask_strength` must be in (0, 1] but is {self.strength}.")
        _check(self.clip_ratio > 0, f"`clip_ratio` must be positive but is {self.clip_ratio}.")
        _check(0.0 <= self.threshold < 1.0, f"`threshold` must be in [0, 1) but is {self.threshold}.")


@dataclass(frozen=True)
class EncodeConfig:
    """Step 2, DDIM encoding to ratio r (Section 3.2, "encoding ratio")."""

    num_steps: int = 50  # T: DDIM steps of the full schedule (paper: 50).
    encode_ratio: float = 0.8  # r: how far to encode; the paper's default is 0.8 (Fig. 4 trade-off).
    # The paper encodes with the unconditional model. diffusers' pipeline inverts under the source prompt
    # with guidance 7.5 instead; `conditional=True` (+ `encode_guidance`) reproduces that.
    conditional: bool = False
    guidance: float = 1.0  # classifier-free guidance during encoding (only with conditional=True).
    # "ddim": the paper's DDIM encoding. "noise": the ablation the paper compares it with (SDEdit's
    # noising): every kept level is a draw of q(x_t | x_0) instead of a DDIM-inverted latent.
    method: str = "ddim"

    def __post_init__(self):
        _check(self.num_steps >= 1, f"`steps` must be >= 1 but is {self.num_steps}.")
        _check(0.0 < self.encode_ratio <= 1.0, f"`encode_ratio` must be in (0, 1] but is {self.encode_ratio}.")
        _check(
            int(self.num_steps * self.encode_ratio) >= 1,
            f"`steps` x `encode_ratio` must give at least one step, but {self.num_steps} x {self.encode_ratio} does not.",
        )
        _check(self.guidance >= 1.0, f"`encode_guidance` must be >= 1 but is {self.guidance}.")
        _check(self.method in ("ddim", "noise"), f"`encode_method` must be ddim or noise but is {self.method!r}.")
        _check(
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

    guidance: float = 7.5  # classifier-free guidance scale (paper: 7.5, Stable Diffusion's default).
    negative_prompt: str = ""  # the unconditional text of classifier-free guidance.

    def __post_init__(self):
        _check(self.guidance >= 1.0, f"`guidance` must be >= 1 but is {self.guidance}.")


# Flat keys (CLI option names with underscores) -> (component, field).
_FLAT = {
    "mask_samples": ("mask", "num_samples"),
    "mask_strength": ("mask", "strength"),
    "clip_ratio": ("mask", "clip_ratio"),
    "threshold": ("mask", "threshold"),
    "steps": ("encode", "num_steps"),
    "encode_ratio": ("encode", "encode_ratio"),
    "conditional_encoding": ("encode", "conditional"),
    "encode_guidance": ("encode", "guidance"),
    "encode_method": ("encode", "method"),
    "guidance": ("decode", "guidance"),
    "negative_prompt": ("decode", "negative_prompt"),
}


@dataclass(frozen=True)
class EditConfig:
    """All parameters that change an edit's pixels. Two runs with equal configs give equal edits."""

    mask: MaskConfig = field(default_factory=MaskConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def flat(self) -> dict:
        return {key: getattr(getattr(self, part), name) for key, (part, name) in _FLAT.items()}

    @classmethod
    def from_flat(cls, values: dict | None = None, **overrides) -> "EditConfig":
        """Build from flat keys; unknown keys raise. ``None`` values mean "keep the default"."""
        merged = {**(values or {}), **{k: v for k, v in overrides.items() if v is not None}}
        unknown = sorted(set(merged) - set(_FLAT))
        if unknown:
            raise ValueError(f"Unknown edit parameter(s) {unknown}; known: {sorted(_FLAT)}.")
        parts: dict[str, dict] = {"mask": {}, "encode": {}, "decode": {}}
        for key, value in merged.items():
            if value is not None:
                part, name = _FLAT[key]
                parts[part][name] = value
        return cls(MaskConfig(**parts["mask"]), EncodeConfig(**parts["encode"]), DecodeConfig(**parts["decode"]))

    def replace(self, **flat_overrides) -> "EditConfig":
        return EditConfig.from_flat({**self.flat(), **flat_overrides})


FLAT_KEYS = tuple(_FLAT)

