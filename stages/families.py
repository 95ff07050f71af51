"""The code each model family runs: its parts, its text conditioning, its denoiser call and its schedule.

The three DiffEdit steps (stages/mask.py, encode.py, decode.py) are written once against :class:`Family`; a
family answers four questions (docs/FAMILIES.md):

- which classes load its folders (:attr:`Family.classes`);
- how prompts become conditioning rows (:meth:`Family.encode_text` -> stages.text.Text);
- how one denoiser call is made (:meth:`Family.forward`: latents, a noise level per row, the rows' text, and
  for FLUX.1-dev the guidance it embeds);
- which schedule the steps walk (:meth:`Family.schedule`: DDIM for the UNets, Euler on the rectified flow for
  the transformers).

Each family mirrors what its diffusers pipeline does (StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
StableDiffusion3Img2ImgPipeline, FluxImg2ImgPipeline); tests/test_families.py compares the conditioning, the
latent packing and the schedules with those pipelines' own helpers.

Shape legend: R rows, C latent channels, h x w latent grid, L tokens, D text width, P pooled width.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from .schedules import DDIMSchedule, FlowSchedule
from .sources import FAMILIES
from .text import Text

SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length
FLUX_T5_TOKENS = 512  # FluxPipeline's


def tokenize(tokenizer, prompts: list[str], max_length: int, device):
    """Token ids (``input_ids``, with their ``attention_mask``) padded to ``max_length``, on ``device``; a prompt
    longer than that is truncated, with a warning."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    full = tokenizer(prompts, padding="longest", truncation=False, return_tensors="pt").input_ids
    if full.shape[-1] > max_length:
        for prompt, row in zip(prompts, full):
            if int((row != tokenizer.pad_token_id).sum()) > max_length:  # counts bos/eos as the model does
                warnings.warn(f"Prompt truncated to the text encoder's {max_length} tokens: {prompt[:80]!r}...",
                              stacklevel=3)
    return ids.to(device)


def _clip_states(model, which: str, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states R x 77 x D, first output) of CLIP encoder ``which`` ("" or "_2"): SDXL's and
    SD3's token embeddings and, for an encoder with a projection, its pooled embedding."""
    tokenizer, encoder = model.parts[f"tokenizer{which}"], model.parts[f"text_encoder{which}"]
    ids = tokenize(tokenizer, prompts, tokenizer.model_max_length, model.device).input_ids
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


class Family:
    """The interface; :class:`SD` is Stable Diffusion 1.x/2.x."""

    name = "sd"
    guidance = "cfg"  # "cfg": classifier-free guidance over two rows; "embedded": a guidance input (FLUX.1-dev)
    classes = {"unet": "diffusers.UNet2DConditionModel", "vae": "diffusers.AutoencoderKL",
               "text_encoder": "transformers.CLIPTextModel", "tokenizer": "transformers.CLIPTokenizer"}

    @property
    def schedule_kind(self) -> str:
        """"ddim" or "flow" (stages.sources.FAMILIES, where the driver reads it without torch)."""
        return FAMILIES[self.name].schedule

    def encode_text(self, model, prompts: list[str]) -> Text:
        tokenizer, encoder = model.parts["tokenizer"], model.parts["text_encoder"]
        ids = tokenize(tokenizer, prompts, tokenizer.model_max_length, model.device)
        mask = ids.attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
        return Text({"embeds": encoder(ids.input_ids, attention_mask=mask)[0]})

    def forward(self, model, x_RChw: torch.Tensor, t_R: torch.Tensor, text: Text, guidance: float | None) -> torch.Tensor:
        return model.unet_forward(x_RChw, t_R, text.embeds)

    def schedule(self, model, num_steps: int, encode_steps: int, latent_hw: tuple[int, int], shift=None,
                 solver="ddim"):
        return DDIMSchedule(model.scheduler_config, num_steps, encode_steps, solver)

    def model_time(self, level, rows: int, model) -> torch.Tensor:
        """The denoiser's time input for a schedule level (or one level per row): here the DDPM timestep."""
        return _on_device(torch.as_tensor(level).float(), rows, model.device)


class SDXL(Family):
    """Two CLIP encoders (penultimate states concatenated), the second's pooled projection, and size time ids."""

    name = "sdxl"
    classes = {**Family.classes, "text_encoder_2": "transformers.CLIPTextModelWithProjection",
               "tokenizer_2": "transformers.CLIPTokenizer"}

    def encode_text(self, model, prompts: list[str]) -> Text:
        states_1, _ = _clip_states(model, "", prompts)
        states_2, pooled = _clip_states(model, "_2", prompts)
        text = Text({"embeds": torch.cat([states_1, states_2], dim=-1), "pooled": pooled})
        if model.index.get("force_zeros_for_empty_prompt", True):
            # The pipeline's unconditional rows are zeros (force_zeros_for_empty_prompt); so are ours for "".
            empty = torch.tensor([p == "" for p in prompts], device=model.device)
            text = Text({k: torch.where(empty.view(-1, *[1] * (v.ndim - 1)), torch.zeros_like(v), v)
                         for k, v in text.parts.items()})
        return text

    def forward(self, model, x_RChw, t_R, text, guidance):
        h, w = (side * model.vae_scale_factor for side in x_RChw.shape[-2:])
        # original size, crop top-left, target size: the edit size, uncropped (the img2img pipeline's defaults).
        time_ids = _size_time_ids(h, w, x_RChw.device, text.embeds.dtype)
        added = {"text_embeds": text.parts["pooled"], "time_ids": time_ids.expand(x_RChw.shape[0], -1)}
        return model.unet_forward(x_RChw, t_R, text.embeds, added)


class SD3(Family):
    """Two CLIP encoders (penultimate states, padded to T5's width) then T5's tokens (zeros without T5); both
    CLIP pooled projections."""

    name = "sd3"
    classes = {"transformer": "diffusers.SD3Transformer2DModel", "vae": "diffusers.AutoencoderKL",
               "text_encoder": "transformers.CLIPTextModelWithProjection",
               "text_encoder_2": "transformers.CLIPTextModelWithProjection", "text_encoder_3": "transformers.T5EncoderModel",
               "tokenizer": "transformers.CLIPTokenizer", "tokenizer_2": "transformers.CLIPTokenizer",
               "tokenizer_3": "transformers.T5TokenizerFast"}

    def encode_text(self, model, prompts: list[str]) -> Text:
        states_1, pooled_1 = _clip_states(model, "", prompts)
        states_2, pooled_2 = _clip_states(model, "_2", prompts)
        clip = torch.cat([states_1, states_2], dim=-1)
        t5 = self._t5(model, prompts, clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Text({"embeds": torch.cat([clip, t5], dim=-2), "pooled": torch.cat([pooled_1, pooled_2], dim=-1)})

    def _t5(self, model, prompts: list[str], dtype) -> torch.Tensor:
        encoder = model.parts.get("text_encoder_3")
        if encoder is None:  # the pipeline's zeros where the T5 encoder was left out
            width = model.denoiser.config.joint_attention_dim
            return torch.zeros(len(prompts), SD3_T5_TOKENS, width, device=model.device, dtype=dtype)
        return encoder(tokenize(model.parts["tokenizer_3"], prompts, SD3_T5_TOKENS, model.device).input_ids)[0]

    def forward(self, model, x_RChw, t_R, text, guidance):
        return model.denoiser(hidden_states=x_RChw, timestep=t_R, encoder_hidden_states=text.embeds,
                              pooled_projections=text.parts["pooled"]).sample

    def schedule(self, model, num_steps, encode_steps, latent_hw, shift=None, solver="ddim"):
        kwargs = {}
        config = flow_config(model.scheduler_config, shift)
        if config.get("use_dynamic_shifting"):
            patch = model.denoiser.config.patch_size
            kwargs["mu"] = flow_shift_mu(config, (latent_hw[0] // patch) * (latent_hw[1] // patch), max_shift=1.16)
        return FlowSchedule(config, num_steps, encode_steps, **kwargs)

    def model_time(self, level, rows, model):
        """The scheduler's timestep: sigma x 1000, float32."""
        return _on_device(torch.as_tensor(level, dtype=torch.float32) * 1000, rows, model.device)


class Flux(Family):
    """CLIP's pooled output and T5's tokens; latents packed 2 x 2 into tokens with their (0, row, col) ids;
    FLUX.1-dev's distilled guidance as an input, no classifier-free guidance."""

    name = "flux"
    guidance = "embedded"
    classes = {"transformer": "diffusers.FluxTransformer2DModel", "vae": "diffusers.AutoencoderKL",
               "text_encoder": "transformers.CLIPTextModel", "text_encoder_2": "transformers.T5EncoderModel",
               "tokenizer": "transformers.CLIPTokenizer", "tokenizer_2": "transformers.T5TokenizerFast"}

    def encode_text(self, model, prompts: list[str]) -> Text:
        clip_tok, clip = model.parts["tokenizer"], model.parts["text_encoder"]
        pooled = clip(tokenize(clip_tok, prompts, clip_tok.model_max_length, model.device).input_ids).pooler_output
        t5_ids = tokenize(model.parts["tokenizer_2"], prompts, FLUX_T5_TOKENS, model.device).input_ids
        return Text({"embeds": model.parts["text_encoder_2"](t5_ids)[0], "pooled": pooled})

    def forward(self, model, x_RChw, t_R, text, guidance):
        R, C, h, w = x_RChw.shape
        embedded = None
        if model.denoiser.config.guidance_embeds:
            embedded = torch.full((R,), float(guidance or 1.0), device=x_RChw.device, dtype=torch.float32)
        out = model.denoiser(hidden_states=pack_latents(x_RChw), timestep=t_R, guidance=embedded,
                             pooled_projections=text.parts["pooled"], encoder_hidden_states=text.embeds,
                             txt_ids=torch.zeros(text.embeds.shape[1], 3, device=x_RChw.device, dtype=x_RChw.dtype),
                             img_ids=latent_ids(h // 2, w // 2, x_RChw.device, x_RChw.dtype)).sample
        return unpack_latents(out, h, w)

    def schedule(self, model, num_steps, encode_steps, latent_hw, shift=None, solver="ddim"):
        config = flow_config(model.scheduler_config, shift)
        kwargs = {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps)}
        if config.get("use_dynamic_shifting"):
            kwargs["mu"] = flow_shift_mu(config, (latent_hw[0] // 2) * (latent_hw[1] // 2), max_shift=1.15)
        return FlowSchedule(config, num_steps, encode_steps, **kwargs)

    def model_time(self, level, rows, model):
        """The pipeline's ``timestep / 1000``: sigma x 1000 rounded to the model's dtype, then divided in it."""
        return _on_device((torch.as_tensor(level, dtype=torch.float32) * 1000).to(model.dtype) / 1000, rows, model.device)


def _on_device(t: torch.Tensor, rows: int, device) -> torch.Tensor:
    """A time value per row on ``device``. A scalar is filled there: copying a CPU tensor would wait for the GPU's
    queue to drain (pageable memory), leaving it idle while the next call is launched."""
    if t.ndim == 1:
        return t.to(device)
    return torch.full((rows,), t.item(), device=device, dtype=t.dtype)


def flow_config(scheduler_config: dict, shift: float | None) -> dict:
    """The scheduler config, with a fixed ``shift`` in place of its own (and of its dynamic shifting) if one is given."""
    return dict(scheduler_config) if shift is None else {**scheduler_config, "shift": shift, "use_dynamic_shifting": False}


def flow_shift_mu(config: dict, image_seq_len: int, max_shift: float) -> float:
    """The resolution-dependent shift of a dynamic-shifting flow schedule (diffusers' ``calculate_shift``:
    linear in the image's token count, from base_shift at base_image_seq_len to max_shift at max_image_seq_len)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    slope = (top - base) / (max_len - base_len)
    return image_seq_len * slope + base - slope * base_len


def pack_latents(x_BChw: torch.Tensor) -> torch.Tensor:
    """B x C x h x w -> B x (h/2 * w/2) x 4C: each 2 x 2 patch one token, channels major (FluxPipeline's layout)."""
    B, C, h, w = x_BChw.shape
    return x_BChw.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`, to B x C x h x w."""
    B, _, D = tokens.shape
    return tokens.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, h, w)


@functools.lru_cache(maxsize=32)
def _size_time_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """SDXL's time ids (original size, crop top-left, target size) of an uncropped h x w edit, 1 x 6, made once per
    size and device: the denoiser is called every step, and a fresh copy to the GPU would wait for its queue."""
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def latent_ids(rows: int, cols: int, device, dtype) -> torch.Tensor:
    """FLUX's position ids of the image tokens: (0, row, col) per token, row-major, (rows * cols) x 3; made once per
    size and device (as :func:`_size_time_ids`). Callers must not modify the tensor."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] += torch.arange(rows)[:, None]
    ids[..., 2] += torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


FAMILY_CODE = {f.name: f() for f in (Family, SDXL, SD3, Flux)}
