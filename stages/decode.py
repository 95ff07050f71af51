"""Step 3 of DiffEdit: masked DDIM decoding under the target text (Couairon et al., Section 3.2).

"We decode with the text query, using classifier-free guidance. [...] Outside the mask, we replace the
decoded latents with the encoded latents of the same timestep" (mask-wise correction):
    y_{t-1} = M * y_{t-1} + (1 - M) * x_{t-1}.

Shape legend: B images, C latent channels, h x w latent grid, L tokens, D text width.
"""

from __future__ import annotations

import torch

from .encode import Trajectory, guided
from .model import DiffEditModel


@torch.no_grad()
def masked_ddim_decode(
    model: DiffEditModel,
    trajectory: Trajectory,
    mask_Bhw: torch.Tensor,
    target_embeds_BLD: torch.Tensor,
    negative_embeds_BLD: torch.Tensor,
    guidance: float = 7.5,
    num_steps: int = 50,
) -> torch.Tensor:
    """Decode from the last latent of ``trajectory`` back to x_0; returns latents_BChw.

    After the step that produces noise level t, the latents outside the mask are replaced with the
    encoded latent at level t (``trajectory.latents[k]``); after the last step, with the image's own
    x_0, so the background is the image's exact latent. (diffusers' pipeline pastes the latent one level
    noisier at every step and never pastes x_0.)
    """
    K = trajectory.num_steps
    scheduler = model.ddim()
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps[num_steps - K :]
    keep_B1hw = mask_Bhw.to(model.device, model.dtype)[:, None]
    x = trajectory.latents[K]
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(x, t)
        pred = guided(model, model_input, t, target_embeds_BLD, negative_embeds_BLD, guidance)
        x = scheduler.step(pred, t, x).prev_sample
        # Mask-wise correction: outside the mask, the encoded latent of the level just reached.
        x = keep_B1hw * x + (1 - keep_B1hw) * trajectory.latents[K - 1 - i]
    return x
