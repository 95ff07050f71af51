"""The noise schedules the DiffEdit steps walk, one interface for both kinds of model (docs/FAMILIES.md).

- :class:`DDIMSchedule`: diffusion models (Stable Diffusion 1.x/2.x, SDXL). Levels are DDPM timesteps; encoding is
  DDIM inversion (Song et al. 2010.02502, eq. 12 run backwards), decoding DDIM with eta = 0. diffusers' own
  DDIM schedulers do the arithmetic, so the results are theirs to the bit. With ``solver="dpm"`` the same levels
  are walked by DPM-Solver++(2M) (Lu et al. 2211.01095, Algorithm 2), both ways: a second-order multistep
  correction on top of each DDIM step, so fewer steps reach the same trajectory.
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

import math

import torch

from .config import check_solver


def img2img_start(num_steps: int, strength: float) -> int:
    """The index of the schedule's first denoising step at ``strength`` (diffusers' img2img rule)."""
    return min(num_steps - min(int(num_steps * strength), num_steps), num_steps - 1)


# DPM-Solver++(2M)'s correction divides by r = h_prev / h; where two adjacent steps differ more than this in
# log-SNR (DDIM inversion's first step, from the image to the first level, is a fraction of the others), the
# extrapolation is unstable and the step stays first order.
MAX_STEP_RATIO = 3.0


class DDIMSchedule:
    """DDIM over a DDPM timestep schedule. ``encode_steps`` K: how many levels encoding and decoding walk.
    ``solver``: ``ddim`` (diffusers' DDIM schedulers) or ``dpm`` (DPM-Solver++(2M) over the same levels)."""

    def __init__(self, scheduler_config: dict, num_steps: int, encode_steps: int, solver: str = "ddim"):
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        check_solver(solver)
        self.forward = DDIMScheduler.from_config(scheduler_config)
        self.forward.set_timesteps(num_steps)
        self.inverse = DDIMInverseScheduler.from_config(scheduler_config)
        self.inverse.set_timesteps(num_steps)
        self.num_steps, self.K = num_steps, encode_steps
        self.encode_levels = self.inverse.timesteps[:encode_steps]  # the model is evaluated at these, climbing
        self.decode_levels = self.forward.timesteps[num_steps - encode_steps :]  # and at these, descending
        self.dpm = _DPMSolver2M(self.forward, self.inverse) if solver == "dpm" else None

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
        if self.dpm:
            return self.dpm.invert(pred, int(self.encode_levels[k]), x)
        return self.inverse.step(pred, self.encode_levels[k], x).prev_sample

    def denoise(self, pred: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """Decoding step i: from level K - i to level K - i - 1."""
        if self.dpm:
            return self.dpm.denoise(pred, int(self.decode_levels[i]), x, last=i == self.K - 1)
        return self.forward.step(pred, self.decode_levels[i], x).prev_sample


class _DPMSolver2M:
    """DPM-Solver++(2M) in data prediction, on the DDIM schedulers' own levels and alphas, in either direction.

    A step from level s to level t (alpha-bar a, lambda = log sqrt(a / (1 - a)), h = lambda_t - lambda_s) is the
    DDIM step sqrt(a_t) x0 + sqrt(1 - a_t) eps plus sqrt(a_t) (1 - e^-h) / (2 r) (x0 - x0_prev), r = h_prev / h:
    the multistep correction of Lu et al.'s Algorithm 2 (diffusers' DPMSolverMultistepScheduler, order 2). The
    first step of a walk, a step whose log-SNR length differs from the one before by more than
    :data:`MAX_STEP_RATIO`, and the last step of decoding (to the final level, as diffusers'
    ``lower_order_final``) are first order, i.e. DDIM's. Each encoding step evaluates the model at its
    destination level, as DDIM inversion does, so the levels and the model's time inputs are the DDIM path's.
    (Evaluated at the level it climbs from instead, as diffusers' DPMSolverMultistepInverseScheduler does,
    inversion of an exact Gaussian denoiser landed further from the exact ODE solution than DDIM inversion, at
    50, 25 and 15 steps.)
    """

    def __init__(self, forward, inverse):
        self.alphas = forward.alphas_cumprod.double()
        self.final, self.initial = float(forward.final_alpha_cumprod), float(inverse.initial_alpha_cumprod)
        self.ratio = forward.config.num_train_timesteps // forward.num_inference_steps
        self.prediction_type = forward.config.prediction_type
        self.previous = {}  # per direction: (x0 of the previous step, lambda at its source level)

    def _alpha(self, t: int, below: float) -> float:
        return float(self.alphas[t]) if t >= 0 else below

    def invert(self, pred, t: int, x):
        return self._step(pred, x, self._alpha(t - self.ratio, self.initial), float(self.alphas[t]), False, "up")

    def denoise(self, pred, t: int, x, last: bool):
        return self._step(pred, x, float(self.alphas[t]), self._alpha(t - self.ratio, self.final), last, "down")

    def _step(self, pred, x, a_s: float, a_t: float, first_order: bool, direction: str):
        x32, pred32 = x.float(), pred.float()
        if self.prediction_type == "v_prediction":
            x0, eps = a_s ** 0.5 * x32 - (1 - a_s) ** 0.5 * pred32, a_s ** 0.5 * pred32 + (1 - a_s) ** 0.5 * x32
        else:
            x0, eps = (x32 - (1 - a_s) ** 0.5 * pred32) / a_s ** 0.5, pred32
        out = a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * eps  # the DDIM step
        lam_s, lam_t = _half_log_snr(a_s), _half_log_snr(a_t)
        if direction in self.previous and not first_order:
            x0_prev, lam_prev = self.previous[direction]
            h, h_prev = lam_t - lam_s, lam_s - lam_prev
            if h != 0 and MAX_STEP_RATIO ** -1 <= h_prev / h <= MAX_STEP_RATIO:
                out = out + a_t ** 0.5 * -math.expm1(-h) / (2 * h_prev / h) * (x0 - x0_prev)
        self.previous[direction] = (x0, lam_s)
        return out.to(pred.dtype)


def _half_log_snr(a: float) -> float:
    """lambda = log(alpha / sigma) of alpha-bar a (infinite at a = 1: the image itself)."""
    return math.inf if a >= 1 else 0.5 * math.log(a / (1 - a))


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
