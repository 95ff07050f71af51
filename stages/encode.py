"""Step 2 of DiffEdit: DDIM encoding of the image latents to ratio r (Couairon et al., Section 3.2).

"We encode the input image in the latent space with the DDIM encoder, with the unconditional model,
up to timestep r" and keep every intermediate latent for the mask-wise correction of step 3.

Shape legend: B images, K = int(T * r) encoding steps, C latent channels, h x w latent grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import EncodeConfig
from .model import DiffEditModel


@dataclass
class Trajectory:
    """Encoded latents: ``latents[k]`` is x after k DDIM encoding steps; ``latents[0]`` is the image's x_0."""

    latents: list[torch.Tensor]  # K + 1 tensors of shape B x C x h x w
    timesteps: torch.Tensor  # the K inverse-DDIM timesteps; latents[k] sits at timesteps[k - 1]

    @property
    def num_steps(self) -> int:
        return len(self.latents) - 1


def guided(model: DiffEditModel, x_BChw, t, embeds_BLD, uncond_BLD, guidance: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + g (eps_c - eps_u); two prompts per latent, one UNet batch."""
    if guidance == 1.0:
        return model.predict(x_BChw, t, embeds_BLD)
    pred = model.predict(x_BChw, t, torch.cat([uncond_BLD, embeds_BLD]))
    pred_uncond, pred_cond = pred.chunk(2)
    return pred_uncond + guidance * (pred_cond - pred_uncond)


@torch.no_grad()
def ddim_encode(
    model: DiffEditModel,
    latents_BChw: torch.Tensor,
    embeds_BLD: torch.Tensor,
    config: EncodeConfig = EncodeConfig(),
    uncond_BLD: torch.Tensor | None = None,
) -> Trajectory:
    """DDIM-invert ``latents_BChw`` for int(T * r) steps (eta = 0, deterministic).

    ``embeds_BLD`` is the unconditional (empty-prompt) embedding for the paper's unconditional encoding,
    or the source prompt's with ``config.conditional`` (then ``config.guidance`` > 1 needs ``uncond_BLD``).
    """
    if config.guidance > 1.0 and uncond_BLD is None:
        raise ValueError("Guided encoding needs the unconditional embeddings (`uncond_BLD`).")
    scheduler = model.ddim_inverse()
    scheduler.set_timesteps(config.num_steps)
    timesteps = scheduler.timesteps[: config.num_encode_steps]
    x = latents_BChw
    latents = [x]
    for t in timesteps:
        model_input = scheduler.scale_model_input(x, t)
        pred = guided(model, model_input, t, embeds_BLD, uncond_BLD, config.guidance)
        # x_{t} from x_{t - T/steps}: the DDIM update of Song et al. (2010.02502, eq. 12) run backwards.
        x = scheduler.step(pred, t, x).prev_sample
        latents.append(x)
    return Trajectory(latents, timesteps)


@torch.no_grad()
def noise_encode(
    model: DiffEditModel, latents_BChw: torch.Tensor, noise_BChw: torch.Tensor, config: EncodeConfig = EncodeConfig()
) -> Trajectory:
    """The paper's ablation of step 2: noise x_0 to each level instead of DDIM-inverting it (SDEdit, 2108.01073).

    ``latents[k] = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` (q(x_t | x_0), DDPM eq. 4) at the same levels
    ``ddim_encode`` reaches, with one draw ``noise_BChw[i]`` per image (its own generator) for every level,
    as diffusers' inpainting pipelines noise the pasted background.
    """
    if noise_BChw.shape != latents_BChw.shape:
        raise ValueError(f"`noise_BChw` must have the latents' shape {tuple(latents_BChw.shape)} but is {tuple(noise_BChw.shape)}.")
    scheduler = model.ddim_inverse()
    scheduler.set_timesteps(config.num_steps)
    timesteps = scheduler.timesteps[: config.num_encode_steps]
    alphas_cumprod = scheduler.alphas_cumprod.to(latents_BChw.device, torch.float32)
    noise_BChw = noise_BChw.to(latents_BChw.device, torch.float32)
    latents = [latents_BChw]
    for t in timesteps:
        a_t = alphas_cumprod[int(t)]
        x = a_t.sqrt() * latents_BChw.float() + (1 - a_t).sqrt() * noise_BChw
        latents.append(x.to(latents_BChw.dtype))
    return Trajectory(latents, timesteps)
