"""Loading a Stable Diffusion 1.x/2.x checkpoint, and the thin wrappers the DiffEdit steps call.

A model is a diffusers folder in the ``model_index.json`` layout (local, or a hub id when a hub is
reachable): ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``. Weights load from
safetensors only; no ``trust_remote_code``: every class is named here.

Shape legend: B images, L tokens, D text width, C latent channels, H x W image, h x w latent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .prefix import PromptFreePrefix
from .sources import RECOMMENDED_DEFAULTS_FILE, ModelLoadError, check_model_folder, is_hub_id

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The UNet's attention kernel (torch.nn.functional.scaled_dot_product_attention's backend); None: PyTorch's choice.
ATTENTION_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("`device` is cuda but torch sees no CUDA device; use --device cpu or auto.")
    return device


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device = torch.device("cpu")) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of auto, {', '.join(DTYPES)} but is {dtype!r}.")
    return DTYPES[dtype]


def _check_max_batch(max_batch: int | None) -> None:
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"`max_batch` must be >= 1 or None but is {max_batch}.")


@dataclass
class DiffEditModel:
    """The loaded components, with the few model-specific conversions the steps need."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    source: str
    device: torch.device
    dtype: torch.dtype
    recommended: dict = field(default_factory=dict)  # the folder's diffedit.json, if any
    attention: str | None = None  # a key of ATTENTION_BACKENDS: the UNet's SDPA kernel; None: PyTorch's choice
    max_batch: int | None = None  # the most rows of one UNet call (bounds memory); None: no cap
    # Run the UNet's prompt-independent first layers once per latent when predict() gets k prompts per latent.
    share_prefix: bool = True
    _fingerprint: str | None = None
    _compiled: set = field(default_factory=set)  # the parts compile() has compiled
    _prefix: PromptFreePrefix = field(init=False, repr=False)

    def __post_init__(self):
        _check_max_batch(self.max_batch)
        self._prefix = PromptFreePrefix(self.unet)  # hooks, no-ops outside predict(); empty for an unknown UNet

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image size the UNet was trained at (sample_size x VAE factor)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """What each side of an edit size must be a multiple of: the VAE's factor times the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def ddim(self):
        """A fresh DDIM scheduler (schedulers hold state, so every call gets its own)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config)

    def ddim_inverse(self):
        from diffusers import DDIMInverseScheduler

        return DDIMInverseScheduler.from_config(self.scheduler_config)

    # -- text -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> embeds_BLD, each distinct prompt encoded once. Too-long prompts are truncated, with a warning."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("`prompts` must be a list of strings.")
        unique = list(dict.fromkeys(prompts))
        max_len = self.tokenizer.model_max_length
        ids = self.tokenizer(unique, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        full = self.tokenizer(unique, padding="longest", truncation=False, return_tensors="pt").input_ids
        if full.shape[-1] > max_len:
            for prompt, row in zip(unique, full):
                if int((row != self.tokenizer.pad_token_id).sum()) > max_len:  # counts bos/eos as the model does
                    warnings.warn(
                        f"Prompt truncated to the text encoder's {max_len} tokens: {prompt[:80]!r}...", stacklevel=2
                    )
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = ids.attention_mask.to(self.device)
        embeds = self.text_encoder(ids.input_ids.to(self.device), attention_mask=attention_mask)[0]
        index = {p: i for i, p in enumerate(unique)}
        return embeds[[index[p] for p in prompts]].to(self.dtype)

    # -- images <-> latents -----------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents_BChw: the posterior *mean*, scaled (deterministic, no sampling)."""
        cfg = self.vae.config
        posterior = self.vae.encode(images_BCHW.to(self.device, self.vae.dtype)).latent_dist
        latents = posterior.mean
        if getattr(cfg, "shift_factor", None) is not None:
            latents = latents - cfg.shift_factor
        return (latents * cfg.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents_BChw: torch.Tensor) -> torch.Tensor:
        """latents_BChw -> images in [-1, 1] (float32)."""
        cfg = self.vae.config
        latents = latents_BChw.to(self.vae.dtype) / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None) is not None:
            latents = latents + cfg.shift_factor
        return self.vae.decode(latents).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def predict(self, latents_BChw: torch.Tensor, t, embeds_KBLD: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output (epsilon or v) for each of B latents under each of its k prompts.

        ``embeds_KBLD`` holds k x B rows, as k blocks of B (block j: every latent's j-th prompt); so does the
        output. With k > 1 the UNet's prompt-independent first layers run once per latent (stages/prefix.py).
        ``t`` is a scalar or one timestep per latent. :attr:`max_batch` caps the rows of one UNet call (a
        latent's k rows stay in one call).
        """
        n = latents_BChw.shape[0]
        k, extra = divmod(embeds_KBLD.shape[0], n)
        if extra or k < 1:
            raise ValueError(f"Got {n} latents and {embeds_KBLD.shape[0]} prompt embeddings; need k x {n} of them.")
        _check_max_batch(self.max_batch)  # it may have been set since
        if isinstance(t, torch.Tensor) and t.ndim == 1:
            t = t.to(self.device)
        else:
            # A scalar timestep is filled on the device: copying a CPU tensor there would wait for the GPU's
            # queue to drain (pageable memory), leaving it idle while the next UNet call is launched.
            t = torch.full((n,), float(t), device=self.device)
        step = max(1, (self.max_batch or k * n) // k)  # latents per UNet call
        shared = self._prefix.copies(k) if self.share_prefix and self._prefix else contextlib.nullcontext()
        outs = []
        with self._attention_kernel(), shared:
            for i in range(0, n, step):
                x, s = latents_BChw[i : i + step], min(step, n - i)
                embeds = embeds_KBLD[i : i + s]
                if k > 1:
                    embeds = torch.cat([embeds_KBLD[j * n + i : j * n + i + s] for j in range(k)])
                    x = torch.cat([x] * k)  # cat, not repeat: it keeps the latents' memory layout, and so the UNet's rounding
                out = self.unet(x, t[i : i + s].repeat(k), encoder_hidden_states=embeds).sample
                outs.append(out.unflatten(0, (k, s)))
        return torch.cat(outs, dim=1).flatten(0, 1)  # k blocks of n rows

    def _attention_kernel(self):
        if self.attention is None:
            return contextlib.nullcontext()
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"`attention` must be one of {', '.join(ATTENTION_BACKENDS)} or None but is {self.attention!r}.")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, ATTENTION_BACKENDS[self.attention]))

    def compile(self, mode: str | None = None, vae: bool = True) -> "DiffEditModel":
        """``torch.compile`` the UNet and (with ``vae``, the default) the VAE's encoder and decoder in place, static shapes.

        In place (``nn.Module.compile``), so weights keep their names; a part already compiled keeps its graphs,
        so ``compile()`` after ``compile(vae=False)`` adds the VAE alone. Each distinct batch size compiles once. A
        job keeps its batches the same size (its actor pads a short batch), so an actor compiles its graphs
        (mask, encoding and decoding batches) once and reuses them. On an H200 at SD 1.5 scale this took about a
        minute and the engine ran at about 50% of its FLOP floor; compiling the VAE too made a batch of 32 edits
        2.5% faster and cut its peak memory from 18.2 to 12.2 GiB (docs/BENCHMARKS.md).
        """
        parts = {"unet": self.unet}
        if vae:
            parts.update(vae_encoder=self.vae.encoder, vae_decoder=self.vae.decoder)
        for name, module in parts.items():
            if name not in self._compiled:
                module.compile(dynamic=False, mode=mode)
                self._compiled.add(name)
        return self

    # -- identity ---------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 over every weight tensor (names, shapes, bytes) and the scheduler config: which weights made an edit."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, module in (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder)):
                for key, tensor in sorted(module.state_dict().items()):
                    h.update(f"{name}.{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                    h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            h.update(json.dumps(self.scheduler_config, sort_keys=True, default=str).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def load_model(model: str | Path, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               max_batch: int | None = None) -> DiffEditModel:
    """Load a Stable Diffusion 1.x/2.x diffusers checkpoint from a local folder or a hub id.

    Epsilon and v-prediction checkpoints both work (the scheduler config says which). ``max_batch`` caps the
    rows of one UNet call (:attr:`DiffEditModel.max_batch`). Raises :class:`ModelLoadError` naming what is
    missing, or why the weights were refused.
    """
    # 1. Where the weights run, and where they come from.
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path = Path(model).expanduser()
    is_local = not is_hub_id(model)
    if is_local:
        check_model_folder(path)
        source = str(path.resolve())
    else:
        source = str(model)  # a hub id such as "stable-diffusion-v1-5/stable-diffusion-v1-5"

    # 2. The components, safetensors only; then the checks that need the scheduler config.
    unet, vae, text_encoder, tokenizer, scheduler_config = _load_components(source, dtype, model, path, is_local)
    if scheduler_config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"Unsupported prediction_type {scheduler_config['prediction_type']!r}.")

    # 3. The folder's recommended edit parameters (diffedit.json), if any.
    recommended = {}
    if is_local and (path / RECOMMENDED_DEFAULTS_FILE).is_file():
        recommended = json.loads((path / RECOMMENDED_DEFAULTS_FILE).read_text())

    # 4. Frozen, in eval mode, on the device.
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return DiffEditModel(unet, vae, text_encoder, tokenizer, scheduler_config, source, device, dtype, recommended,
                         max_batch=max_batch)


def _load_components(source: str, dtype: torch.dtype, model: str | Path, path: Path, is_local: bool) -> tuple:
    """(unet, vae, text_encoder, tokenizer, scheduler_config) from ``source``; a :class:`ModelLoadError` if any fails."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kwargs = dict(use_safetensors=True)
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **kwargs)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        scheduler_config = dict(DDIMScheduler.load_config(source, subfolder="scheduler"))
    except (OSError, EnvironmentError) as exc:
        where = "folder" if is_local else "hub id"
        raise ModelLoadError(
            f"Could not load the model {where} {model!r}: {exc}".strip()
            + ("" if is_local else f" (no local folder {path} exists, and a hub id needs network access and safetensors weights on the hub).")
        ) from exc
    return unet, vae, text_encoder, tokenizer, scheduler_config
