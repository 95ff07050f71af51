"""Step 3 of DiffEdit: masked decoding under the target text (Couairon et al., Section 3.2).

"We decode with the text query, using classifier-free guidance. [...] Outside the mask, we replace the
decoded latents with the encoded latents of the same timestep" (mask-wise correction):
    y_{t-1} = M * y_{t-1} + (1 - M) * x_{t-1}.
Decoding is DDIM for the diffusion families, Euler steps of the flow ODE for the rectified-flow ones; the
guidance is classifier-free, or embedded for a guidance-distilled model (FLUX.1-dev).

Shape legend: B images, C latent channels, h x w latent grid.
"""

from __future__ import annotations

import torch

from .encode import Trajectory, guided
from .model import DiffEditModel
from .text import Text


@torch.no_grad()
def masked_decode(
    model: DiffEditModel,
    trajectory: Trajectory,
    mask_Bhw: torch.Tensor,
    target: Text,
    negative: Text,
    guidance: float = 7.5,
    num_steps: int = 50,
    shift: float | None = None,
    solver: str = "ddim",
    cache_interval: int = 1,
) -> torch.Tensor:
    """Decode from the last latent of ``trajectory`` back to x_0; returns latents_BChw.

    After the step that reaches a level, the latents outside the mask are replaced with the encoded latent at
    that level (``trajectory.latents[k]``); after the last step, with the image's own x_0, so the background is
    the image's exact latent. (diffusers' pipeline pastes the latent one level noisier at every step and never
    pastes x_0.) ``solver`` and ``shift`` pick the schedule (stages/schedules.py); ``cache_interval`` k > 1 runs
    the whole UNet every k-th step only (stages/reuse.py).
    """
    K = trajectory.num_steps
    x = trajectory.latents[K]
    schedule = model.schedule(num_steps, K, x.shape[-2:], shift, solver)
    keep_B1hw = mask_Bhw.to(model.device, model.dtype)[:, None]
    with model.feature_reuse(cache_interval):
        for i, t in enumerate(schedule.decode_levels):
            pred = guided(model, x, t, target, negative, guidance)
            x = schedule.denoise(pred, i, x)
            # Mask-wise correction: outside the mask, the encoded latent of the level just reached.
            x = keep_B1hw * x + (1 - keep_B1hw) * trajectory.latents[K - 1 - i]
    return x
