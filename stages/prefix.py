"""The UNet's prompt-independent first layers, run once per latent when a batch holds each latent under k prompts.

Every UNet batch DiffEdit runs pairs each latent with two prompts: source and target (the mask), unconditional
and conditional (guided encoding and decoding). The layers before a UNet's first cross-attention see the latent
and the timestep but not the prompt, so the k rows of one latent compute the same values there. In Stable
Diffusion's UNet these are the first ResNet block and the first transformer block's self-attention, both at the
full latent resolution: about 7% of a forward's FLOPs at SD 1.5 scale, and more of its time, since that
self-attention (4096 tokens, head size 40) runs at a third of the GPU's matmul rate.

Forward hooks on those layers run them on the first copy of the batch and repeat the result k times, so the
UNet's code and weights (and their names) stay diffusers' own. The hooks are no-ops unless
:meth:`PromptFreePrefix.copies` says how many copies the batch holds; ``DiffEditModel.predict`` does.

Shape legend: k copies, s latents per copy; the batch is k blocks of s rows, block j holding every latent's
j-th prompt.
"""

from __future__ import annotations

import contextlib

import torch

# BasicTransformerBlock norm types whose first norm sees the hidden states (and the timestep) only, not the text.
PROMPT_FREE_NORMS = ("layer_norm", "layer_norm_i2vgen")


def prompt_free_modules(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's layers that see no prompt and whose input is the same for every copy of a latent.

    For a diffusers UNet2DConditionModel without text added to its time embedding (SD 1.x/2.x): the first down
    block's first ResNet and, when that block has attention, its first transformer block's self-attention.
    Anything unrecognised gives an empty list: no sharing, the plain UNet.
    """
    config = getattr(unet, "config", None)
    blocks = getattr(unet, "down_blocks", None)
    if config is None or not blocks or getattr(config, "addition_embed_type", None) is not None:
        return []  # text added to the time embedding reaches every ResNet
    first = blocks[0]
    resnets = getattr(first, "resnets", None)
    if not resnets:
        return []
    modules = [resnets[0]]
    attentions = getattr(first, "attentions", None)
    transformer_blocks = getattr(attentions[0], "transformer_blocks", None) if attentions else None
    if transformer_blocks:
        block = transformer_blocks[0]
        self_attention = not getattr(block, "only_cross_attention", True) and not getattr(block.attn1, "is_cross_attention", True)
        if self_attention and getattr(block, "norm_type", None) in PROMPT_FREE_NORMS:
            modules.append(block.attn1)
    return modules


def _first_copy(value, rows: int, keep: int):
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == rows:
        return value[:keep]
    return value


class PromptFreePrefix:
    """Hooks on :func:`prompt_free_modules` that compute them for the first of k copies and repeat the result."""

    def __init__(self, unet: torch.nn.Module):
        self.modules = prompt_free_modules(unet)
        self._copies = 1  # read by the hooks; torch.compile guards on it, so each value gets its own graph
        for module in self.modules:
            module.register_forward_pre_hook(self._slice, with_kwargs=True)
            module.register_forward_hook(self._repeat)

    def __bool__(self) -> bool:
        return bool(self.modules)

    @contextlib.contextmanager
    def copies(self, k: int):
        """Within this block, every UNet batch is k blocks of identical latents (and timesteps)."""
        if k < 1:
            raise ValueError(f"`k` must be at least 1 but is {k}.")
        previous, self._copies = self._copies, k
        try:
            yield self
        finally:
            self._copies = previous

    def _slice(self, module, args, kwargs):
        k = self._copies
        if k == 1:
            return None
        rows = args[0].shape[0]
        if rows % k:
            raise ValueError(f"A batch of {rows} rows cannot hold {k} copies of its latents.")
        keep = rows // k
        return tuple(_first_copy(a, rows, keep) for a in args), {n: _first_copy(v, rows, keep) for n, v in kwargs.items()}

    def _repeat(self, module, args, output):
        k = self._copies
        if k == 1:
            return None
        return torch.cat([output] * k)  # keeps the output's memory layout, as the unshared batch has it
