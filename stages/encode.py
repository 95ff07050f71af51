"""Step 2 of DiffEdit: encoding the image latents to ratio r (Couairon et al., Section 3.2).

"We encode the input image in the latent space with the DDIM encoder, with the unconditional model,
up to timestep r" and keep every intermediate latent for the mask-wise correction of step 3. For the
diffusion families the encoder is DDIM inversion; for the rectified-flow families it is the flow ODE integrated
backwards from the image with the unconditional velocity (stages/schedules.py, docs/FAMILIES.md).

Shape legend: B images, K = int(T * r) encoding steps, C latent channels, h x w latent grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import EncodeConfig
from .model import DiffEditModel
from .text import Text


@dataclass
class Trajectory:
    """Encoded latents: ``latents[k]`` is x after k encoding steps; ``latents[0]`` is the image's x_0."""

    latents: list[torch.Tensor]  # K + 1 tensors of shape B x C x h x w
    levels: torch.Tensor | None  # the K levels the encoding reached: latents[k] sits at levels[k - 1]

    @property
    def num_steps(self) -> int:
        return len(self.latents) - 1


def guided(model: DiffEditModel, x_BChw, t, text: Text, uncond: Text | None, guidance: float) -> torch.Tensor:
    """The guided prediction under ``text``: classifier-free guidance (Ho & Salimans 2022), u + g (c - u) with two
    prompts per latent in one denoiser batch; or, for a guidance-distilled model (FLUX.1-dev), one pass with
    ``guidance`` embedded."""
    if model.family.guidance == "embedded":
        return model.predict(x_BChw, t, text, guidance=guidance)
    if guidance == 1.0:
        return model.predict(x_BChw, t, text)
    pred = model.predict(x_BChw, t, Text.cat([uncond, text]))
    pred_uncond, pred_cond = pred.chunk(2)
    return pred_uncond + guidance * (pred_cond - pred_uncond)


@torch.no_grad()
def invert(
    model: DiffEditModel,
    latents_BChw: torch.Tensor,
    text: Text,
    config: EncodeConfig = EncodeConfig(),
    uncond: Text | None = None,
) -> Trajectory:
    """Invert ``latents_BChw`` for int(T * r) steps, deterministically: DDIM (eta = 0) or the flow's Euler steps.

    ``text`` is the empty prompt's for the paper's unconditional encoding, or the source prompt's with
    ``config.conditional`` (then ``config.guidance`` > 1 needs ``uncond``, except for a guidance-distilled model,
    which embeds it).
    """
    if config.guidance > 1.0 and uncond is None and model.family.guidance == "cfg":
        raise ValueError("Guided encoding needs the unconditional text (`uncond`).")
    schedule = model.schedule(config.num_steps, config.num_encode_steps, latents_BChw.shape[-2:], config.shift,
                              config.solver)
    x = latents_BChw
    latents = [x]
    with model.feature_reuse(config.cache_interval, "encode_cache_interval"):
        for k, t in enumerate(schedule.encode_levels):
            pred = guided(model, x, t, text, uncond, config.guidance)
            # One level up: the DDIM update of Song et al. (2010.02502, eq. 12) run backwards (with its DPM-Solver
            # correction), or an Euler step of the flow ODE towards noise.
            x = schedule.invert(pred, k, x)
            latents.append(x)
    return Trajectory(latents, schedule.encode_levels)


@torch.no_grad()
def noise_encode(
    model: DiffEditModel, latents_BChw: torch.Tensor, noise_BChw: torch.Tensor, config: EncodeConfig = EncodeConfig()
) -> Trajectory:
    """The paper's ablation of step 2: noise x_0 to each level instead of inverting it (SDEdit, 2108.01073).

    ``latents[k]`` is q(x_t | x_0) (DDPM eq. 4), or the straight path's point, at the level ``invert``
    reaches after k steps, with one draw ``noise_BChw[i]`` per image (its own generator) for every level, as
    diffusers' inpainting pipelines noise the pasted background.
    """
    if noise_BChw.shape != latents_BChw.shape:
        raise ValueError(f"`noise_BChw` must have the latents' shape {tuple(latents_BChw.shape)} but is {tuple(noise_BChw.shape)}.")
    schedule = model.schedule(config.num_steps, config.num_encode_steps, latents_BChw.shape[-2:], config.shift)
    noise_BChw = noise_BChw.to(latents_BChw.device, latents_BChw.dtype)
    latents = [latents_BChw]
    for k in range(1, config.num_encode_steps + 1):
        latents.append(schedule.add_noise(latents_BChw, noise_BChw, schedule.level(k)))
    return Trajectory(latents, schedule.encode_levels)
