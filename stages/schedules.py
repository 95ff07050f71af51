"""The noise schedules the DiffEdit steps walk, one interface for both kinds of model (docs/FAMILIES.md).

- :class:`DDIMSchedule`: diffusion models (Stable Diffusion 1.x/2.x, SDXL). Levels are DDPM timesteps; encoding is
  DDIM inversion (Song et al. 2010.02502, eq. 12 run backwards), decoding DDIM with eta = 0. diffusers' own
  DDIM schedulers do the arithmetic, so the results are theirs to the bit.
- :class:`FlowSchedule`: rectified-flow transformers (Stable Diffusion 3.x, FLUX.1). Levels are sigmas in [0, 1]
  on the straight path x_s = (1 - s) x_0 + s eps; the model predicts the velocity v = eps - x_0. Encoding
  integrates the flow ODE backwards from the image (Euler: x_{s'} = x_s + (s' - s) v(x_s, s), s' > s); decoding
  forwards, as FlowMatchEulerDiscreteScheduler.step does. The sigmas are the scheduler's own (shift, dynamic
  shift), set as the family's img2img pipeline sets them.

Both run a schedule of ``num_steps`` levels of which the last K = int(num_steps * r) are walked: encoding climbs
from the image to the K-th level, keeping every latent (``latents[k]`` at :meth:`level` k); decoding step i goes
from level K - i to level K - i - 1.

Shape legend: B images, C latent channels, h x w latent grid.
"""

from __future__ import annotations

import torch


def img2img_start(num_steps: int, strength: float) -> int:
    """The index of the schedule's first denoising step at ``strength`` (diffusers' img2img rule)."""
    return min(num_steps - min(int(num_steps * strength), num_steps), num_steps - 1)


class DDIMSchedule:
    """DDIM over a DDPM timestep schedule. ``encode_steps`` K: how many levels encoding and decoding walk."""

    def __init__(self, scheduler_config: dict, num_steps: int, encode_steps: int):
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        self.forward = DDIMScheduler.from_config(scheduler_config)
        self.forward.set_timesteps(num_steps)
        self.inverse = DDIMInverseScheduler.from_config(scheduler_config)
        self.inverse.set_timesteps(num_steps)
        self.num_steps, self.K = num_steps, encode_steps
        self.encode_levels = self.inverse.timesteps[:encode_steps]  # the model is evaluated at these, climbing
        self.decode_levels = self.forward.timesteps[num_steps - encode_steps :]  # and at these, descending

    def level(self, k: int):
        """The noise level of the latent after k encoding steps (k = 0: the image)."""
        return 0 if k == 0 else self.encode_levels[k - 1]

    def mask_level(self, strength: float):
        return self.forward.timesteps[img2img_start(self.num_steps, strength)]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (DDPM eq. 4)."""
        t = torch.as_tensor(level).reshape(1).expand(x0.shape[0])
        return self.forward.add_noise(x0, noise, t)

    def invert(self, pred: torch.Tensor, k: int, x: torch.Tensor) -> torch.Tensor:
        """Encoding step k: from level k to level k + 1."""
        return self.inverse.step(pred, self.encode_levels[k], x).prev_sample

    def denoise(self, pred: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """Decoding step i: from level K - i to level K - i - 1."""
        return self.forward.step(pred, self.decode_levels[i], x).prev_sample


class FlowSchedule:
    """Euler over a rectified-flow sigma schedule. ``scheduler_kwargs``: what the family's img2img pipeline passes
    to ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (``sigmas``, ``mu``)."""

    def __init__(self, scheduler_config: dict, num_steps: int, encode_steps: int, **scheduler_kwargs):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(num_steps, **scheduler_kwargs)
        self.sigmas = scheduler.sigmas.float()  # num_steps + 1, descending to 0
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.num_steps, self.K = num_steps, encode_steps
        # Climbing: 0, s_{T-1}, ..., s_{T-K}; the model is evaluated at every level but the last.
        self.climb = self.sigmas[num_steps - encode_steps :].flip(0)
        self.encode_levels = self.climb[:-1]
        self.decode_levels = self.sigmas[num_steps - encode_steps : num_steps]

    def level(self, k: int) -> torch.Tensor:
        return self.climb[k]

    def mask_level(self, strength: float) -> torch.Tensor:
        return self.sigmas[img2img_start(self.num_steps, strength)]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level) -> torch.Tensor:
        """The straight path: (1 - s) x_0 + s eps, in float32, cast back."""
        s = float(level)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def invert(self, pred: torch.Tensor, k: int, x: torch.Tensor) -> torch.Tensor:
        return _euler(x, pred, self.climb[k + 1] - self.climb[k])

    def denoise(self, pred: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        j = self.num_steps - self.K + i
        return _euler(x, pred, self.sigmas[j + 1] - self.sigmas[j])


def _euler(x: torch.Tensor, velocity: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
    """x + ds v in float32, cast to the velocity's dtype (FlowMatchEulerDiscreteScheduler.step's rounding)."""
    return (x.float() + ds.to(x.device) * velocity).to(velocity.dtype)
