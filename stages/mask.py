"""Step 1 of DiffEdit: infer the edit mask by contrasting noise predictions (Couairon et al., Section 3.2).

"We add noise to the input image [at strength 50%] and compute the noise estimates conditioned on the
query text and on the reference text [...]. The difference is averaged over n = 10 noise samples; we
remove extreme values, rescale to [0, 1] and binarise with a threshold of 0.5."
For the rectified-flow families the noise goes on along the straight path (x_s = (1 - s) x_0 + s eps at s = the
strength) and the difference is of the predicted velocities v = eps - x_0 (docs/FAMILIES.md).

Shape legend: B images, N noise samples, C latent channels, h x w latent grid, H x W image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import MaskConfig
from .model import DiffEditModel
from .text import Text


@dataclass
class MaskResult:
    soft_Bhw: torch.Tensor  # float32 map in [0, 1], per image
    mask_Bhw: torch.Tensor  # bool, soft > threshold


def normalize_map(diff_Bhw: torch.Tensor, config: MaskConfig) -> MaskResult:
    """Clip extreme values at ``clip_ratio`` x the image's own mean and rescale to [0, 1], image by image.

    diffusers' pipeline uses the mean over the whole *batch*, so there an image's mask depends on its
    batch-mates; here each image is normalised alone.
    """
    clamp_B11 = diff_Bhw.float().mean(dim=(1, 2), keepdim=True) * config.clip_ratio
    clamp_B11 = clamp_B11.clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero map stays all zero
    soft_Bhw = torch.minimum(diff_Bhw.float(), clamp_B11) / clamp_B11
    return MaskResult(soft_Bhw, soft_Bhw > config.threshold)


@torch.no_grad()
def infer_mask(
    model: DiffEditModel,
    latents_BChw: torch.Tensor,
    source_text: Text,
    target_text: Text,
    noise_BNChw: torch.Tensor,
    config: MaskConfig = MaskConfig(),
    num_steps: int = 50,
    guidance: float | None = None,
    shift: float | None = None,
) -> MaskResult:
    """DiffEdit's mask for a batch: image i is noised with ``noise_BNChw[i]`` (its own N draws).

    Classifier-free guidance is not applied here: with the same unconditional pass for both prompts, the
    guided difference is ``g * (eps_target - eps_source)``, and the per-image rescaling cancels ``g``. So
    the 2N unconditional passes diffusers' pipeline runs change nothing and are skipped.
    """
    B, N = noise_BNChw.shape[:2]
    if latents_BChw.shape[0] != B:
        raise ValueError(f"Got {latents_BChw.shape[0]} latents but noise for {B} images.")
    schedule = model.schedule(num_steps, 1, latents_BChw.shape[-2:], shift)
    t = schedule.mask_level(config.strength)
    # 1. Noise every image N times at strength s: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (diffusion), or
    #    x_s = (1 - s) x_0 + s eps (flow).
    x0_XChw = latents_BChw.repeat_interleave(N, dim=0)
    noise_XChw = noise_BNChw.flatten(0, 1).to(latents_BChw.device, latents_BChw.dtype)
    noisy_XChw = schedule.add_noise(x0_XChw, noise_XChw, t)
    # 2. Predict the noise (or velocity) under the source (reference) and the target (query) text: two prompts per
    #    noised latent. FLUX.1-dev embeds ``guidance`` (the decoding's); the others ignore it.
    text = Text.cat([source_text.repeat_interleave(N), target_text.repeat_interleave(N)])
    pred = model.predict(noisy_XChw, t, text, guidance=guidance)
    pred_source, pred_target = pred.float().chunk(2)
    # 3. |difference|, averaged over the N samples and the C channels.
    diff_Bhw = (pred_target - pred_source).abs().reshape(B, N, *pred.shape[1:]).mean(dim=(1, 2))
    # 4. Remove extremes, rescale to [0, 1] per image, binarise.
    return normalize_map(diff_Bhw, config)


def latent_mask_from_image(mask_BHW: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A user mask at image resolution (already resized to the model's resolution) -> bool mask_Bhw.

    A latent cell is editable when any pixel it covers is in the mask (max pooling), so the object is
    edited whole; the cost is at most one latent cell of background around it.
    """
    m = mask_BHW.float()[:, None]
    return F.adaptive_max_pool2d(m, latent_hw)[:, 0] > 0.5


def upsample_map(map_Bhw: torch.Tensor, size_HW: tuple[int, int], soft: bool = False) -> torch.Tensor:
    """A latent-resolution mask (nearest) or soft map (bilinear) -> image resolution, shape B x H x W."""
    m = map_Bhw.float()[:, None]
    if soft:
        return F.interpolate(m, size=size_HW, mode="bilinear", align_corners=False)[:, 0]
    return F.interpolate(m, size=size_HW, mode="nearest")[:, 0] > 0.5
