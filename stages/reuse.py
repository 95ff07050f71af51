"""Feature reuse across steps: a UNet's deep features computed every k-th step and reused in between.

DeepCache (Ma, Fang and Wang, CVPR 2024, arXiv:2312.00858): between adjacent steps of a walk the output of a
UNet's deep blocks changes little, while its shallowest down and up blocks (at the full latent resolution)
carry the details. Every k-th call runs the whole UNet and keeps what enters its last up block; the calls in
between run only the shallow path (time embedding, ``conv_in``, the first down block, the last up block, the
output layers) on the kept features. k = 1 is the plain UNet, bit for bit.

The forward below is diffusers' ``UNet2DConditionModel.forward`` restricted to what Stable Diffusion 1.x/2.x and
SDXL use (no ControlNet or adapter residuals, no attention masks), split at the last up block; it calls the
UNet's own blocks and embedding helpers, so weights, hooks (stages/prefix.py) and attention processors are
diffusers'. :func:`reusable` says whether a UNet has that shape.

Shape legend: R rows (latents x prompts) of one denoiser call, C latent channels, h x w latent grid.
"""

from __future__ import annotations

import contextlib

import torch


def reusable(unet: torch.nn.Module) -> bool:
    """Whether :class:`FeatureReuse` can split ``unet``: a diffusers UNet2DConditionModel of the SD/SDXL kind."""
    config = getattr(unet, "config", None)
    needed = ("down_blocks", "up_blocks", "conv_in", "get_time_embed", "get_aug_embed")
    return (config is not None and all(hasattr(unet, n) for n in needed) and len(unet.up_blocks) >= 2
            and not config.get("center_input_sample") and config.get("class_embed_type") is None
            and config.get("addition_embed_type") in (None, "text_time") and config.get("encoder_hid_dim_type") is None)


def _embed(unet, x_RChw, t_R, text_RLD, added):
    """The time embedding (with SDXL's text/size embedding added), as the UNet's forward computes it."""
    emb = unet.time_embedding(unet.get_time_embed(sample=x_RChw, timestep=t_R), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=text_RLD, added_cond_kwargs=added or {})
    emb = emb + aug if aug is not None else emb
    return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb


def _down(block, h, emb, text_RLD):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, encoder_hidden_states=text_RLD)
    return block(hidden_states=h, temb=emb)


def _up(block, h, skips, emb, text_RLD):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=text_RLD)
    return block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips)


def _shallow_head(unet, x_RChw, t_R, text_RLD, added):
    """(embedding, the skips of the first down block and conv_in, the first down block's output)."""
    emb = _embed(unet, x_RChw, t_R, text_RLD, added)
    h = unet.conv_in(x_RChw)
    out, skips = _down(unet.down_blocks[0], h, emb, text_RLD)
    return emb, (h,) + tuple(skips), out


def _shallow_tail(unet, deep, skips, emb, text_RLD):
    """The last up block on the deep features and the shallow skips, then the output layers."""
    last = unet.up_blocks[-1]
    h = _up(last, deep, skips[-len(last.resnets):], emb, text_RLD)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


def full_forward(unet, x_RChw, t_R, text_RLD, added=None):
    """The whole UNet: (its output, the features entering its last up block)."""
    emb, skips, h = _shallow_head(unet, x_RChw, t_R, text_RLD, added)
    for block in unet.down_blocks[1:]:
        h, more = _down(block, h, emb, text_RLD)
        skips += tuple(more)
    if unet.mid_block is not None:
        mid = unet.mid_block
        h = mid(h, emb, encoder_hidden_states=text_RLD) if getattr(mid, "has_cross_attention", False) else mid(h, emb)
    for block in unet.up_blocks[:-1]:
        n = len(block.resnets)
        h, skips = _up(block, h, skips[-n:], emb, text_RLD), skips[:-n]
    return _shallow_tail(unet, h, skips, emb, text_RLD), h


def shallow_forward(unet, x_RChw, t_R, text_RLD, deep, added=None):
    """The shallow path on kept deep features: the first down block's skips, the last up block."""
    emb, skips, _ = _shallow_head(unet, x_RChw, t_R, text_RLD, added)
    return _shallow_tail(unet, deep, skips[: len(unet.up_blocks[-1].resnets)], emb, text_RLD)


class FeatureReuse:
    """Which calls of a walk run the whole UNet, and the deep features they keep (one per denoiser call of a
    step: a step of ``DiffEditModel.predict`` may split its rows into several calls)."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.interval = 1
        self._full, self._shallow = full_forward, shallow_forward
        self._kept: dict[int, torch.Tensor] = {}
        self._step = self._call = 0

    def compile(self, mode: str | None = None) -> None:
        self._full = torch.compile(full_forward, dynamic=False, mode=mode)
        self._shallow = torch.compile(shallow_forward, dynamic=False, mode=mode)

    @property
    def active(self) -> bool:
        return self.interval > 1

    @contextlib.contextmanager
    def every(self, k: int):
        """Within this block, each step (``next_step``) runs the whole UNet when its index is a multiple of k."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"The feature-reuse interval must be an integer >= 1 but is {k!r}.")
        previous, self.interval, self._step = self.interval, k, -1
        try:
            yield self
        finally:
            self.interval, self._kept = previous, {}

    def next_step(self) -> None:
        self._step, self._call = self._step + 1, 0

    def __call__(self, x_RChw, t_R, text_RLD, added=None) -> torch.Tensor:
        call, self._call = self._call, self._call + 1
        kept = self._kept.get(call)
        if self._step % self.interval == 0 or kept is None or kept.shape[0] != x_RChw.shape[0]:
            out, deep = self._full(self.unet, x_RChw, t_R, text_RLD, added)
            self._kept[call] = deep.clone()  # a compiled call with CUDA graphs reuses its output memory at the next
            return out
        return self._shallow(self.unet, x_RChw, t_R, text_RLD, kept, added)
