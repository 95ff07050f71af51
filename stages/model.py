"""Loading a diffusers model of any supported family, and the thin wrappers the DiffEdit steps call.

A model is a diffusers folder in the ``model_index.json`` layout (local, or a hub id when a hub is reachable);
its family (Stable Diffusion 1.x/2.x, SDXL, Stable Diffusion 3.x, FLUX.1) is read from that file
(stages.sources.model_family) and its code is in stages/families.py. Weights load from safetensors only; no
``trust_remote_code``: every class is named in stages/families.py.

Shape legend: B images, L tokens, D text width, C latent channels, H x W image, h x w latent.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .families import FAMILY_CODE, Family
from .prefix import PromptFreePrefix
from .reuse import FeatureReuse, reusable
from .schedules import DDIMSchedule, FlowSchedule
from .sources import (FAMILIES, RECOMMENDED_DEFAULTS_FILE, ModelLoadError, check_family, check_model_folder,
                      family_components, family_defaults, is_hub_id, model_geometry)
from .text import Text

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
    """The loaded parts of one model and its family's code, with the few conversions the steps need."""

    family: Family
    parts: dict  # component folder -> loaded module or tokenizer (stages.sources.FAMILIES[...].components)
    index: dict  # the folder's model_index.json
    scheduler_config: dict
    source: str
    device: torch.device
    dtype: torch.dtype
    recommended: dict = field(default_factory=dict)  # the family's edit defaults, then the folder's diffedit.json
    attention: str | None = None  # a key of ATTENTION_BACKENDS: the denoiser's SDPA kernel; None: PyTorch's choice
    max_batch: int | None = None  # the most rows of one denoiser call (bounds memory); None: no cap
    # Run the UNet's prompt-independent first layers once per latent when predict() gets k prompts per latent.
    share_prefix: bool = True
    _fingerprint: str | None = None
    _compiled: set = field(default_factory=set)  # the parts compile() has compiled
    _graphs: bool = False  # compiled with CUDA graphs: a compiled call's output memory is reused by the next call
    _prefix: PromptFreePrefix = field(init=False, repr=False)
    _reuse: FeatureReuse | None = field(init=False, repr=False)

    def __post_init__(self):
        _check_max_batch(self.max_batch)
        self._prefix = PromptFreePrefix(self.denoiser)  # hooks, no-ops outside predict(); empty unless SD's UNet
        self._reuse = FeatureReuse(self.denoiser) if reusable(self.denoiser) else None

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network the steps call: a UNet (SD, SDXL) or a transformer (SD3, FLUX.1)."""
        return self.parts[FAMILIES[self.family.name].denoiser]

    unet = denoiser  # the name Stable Diffusion's code and our older callers use

    @property
    def vae(self) -> torch.nn.Module:
        return self.parts["vae"]

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.parts["text_encoder"]

    @property
    def tokenizer(self):
        return self.parts["tokenizer"]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def _geometry(self) -> dict:
        return model_geometry(self.family.name, dict(self.denoiser.config), dict(self.vae.config))

    @property
    def resolution(self) -> int:
        """The image size the denoiser was trained at (its latent sample size x the VAE's factor)."""
        return self._geometry["resolution"]

    @property
    def size_multiple(self) -> int:
        """What each side of an edit size must be a multiple of: the VAE's factor times the UNet's downsampling
        or the transformer's patch."""
        return self._geometry["size_multiple"]

    @property
    def prediction_type(self) -> str:
        """epsilon or v_prediction (diffusion families); flow (the rectified-flow families' velocity)."""
        return "flow" if self.family.schedule_kind == "flow" else self.scheduler_config.get("prediction_type", "epsilon")

    def schedule(self, num_steps: int, encode_steps: int, latent_hw: tuple[int, int],
                 shift: float | None = None, solver: str = "ddim") -> DDIMSchedule | FlowSchedule:
        """The schedule the steps walk for latents of ``latent_hw`` (FLUX's shift depends on the size). ``shift``
        (rectified-flow families only) replaces the scheduler config's shift, and its dynamic shifting; ``solver``
        (diffusion families only) is ``ddim`` or ``dpm`` (DPM-Solver++(2M) over the same levels)."""
        if shift is not None and self.family.schedule_kind != "flow":
            raise ValueError(f"`shift` applies to the rectified-flow families (sd3, flux), not to {self.family.name}.")
        if solver != "ddim" and self.family.schedule_kind != "ddim":
            raise ValueError(f"`solver` {solver} applies to the diffusion families (sd, sdxl); {self.family.name} "
                             "walks its flow with Euler steps.")
        return self.family.schedule(self, num_steps, encode_steps, tuple(latent_hw), shift, solver)

    def ddim(self):
        """A fresh DDIM scheduler of a diffusion family (schedulers hold state, so every call gets its own)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config)

    # -- text -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Text:
        """prompts -> one row of conditioning each (stages.text.Text), each distinct prompt encoded once. Too-long
        prompts are truncated, with a warning."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("`prompts` must be a list of strings.")
        unique = list(dict.fromkeys(prompts))
        text = self.family.encode_text(self, unique)
        index = {p: i for i, p in enumerate(unique)}
        return text[[index[p] for p in prompts]].to(self.dtype)

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
    def predict(self, latents_BChw: torch.Tensor, t, text_KB: Text, guidance: float | None = None) -> torch.Tensor:
        """The denoiser's raw output (epsilon, v or the flow's velocity) for each of B latents under each of its
        k prompts.

        ``text_KB`` holds k x B rows, as k blocks of B (block j: every latent's j-th prompt); so does the output.
        With k > 1 a UNet's prompt-independent first layers run once per latent (stages/prefix.py). ``t`` is a
        schedule level (a scalar, or one per latent). ``guidance`` is what FLUX.1-dev embeds (other families
        ignore it). :attr:`max_batch` caps the rows of one call (a latent's k rows stay in one call).
        """
        n = latents_BChw.shape[0]
        k, extra = divmod(len(text_KB), n)
        if extra or k < 1:
            raise ValueError(f"Got {n} latents and {len(text_KB)} prompt embeddings; need k x {n} of them.")
        _check_max_batch(self.max_batch)  # it may have been set since
        t = self.family.model_time(t, n, self)
        step = max(1, (self.max_batch or k * n) // k)  # latents per denoiser call
        if self._reusing:
            self._reuse.next_step()
        shared = self._prefix.copies(k) if self.share_prefix and self._prefix else contextlib.nullcontext()
        outs = []
        with self._attention_kernel(), shared:
            for i in range(0, n, step):
                x, s = latents_BChw[i : i + step], min(step, n - i)
                text = text_KB[i : i + s]
                if k > 1:
                    text = Text.cat([text_KB[j * n + i : j * n + i + s] for j in range(k)])
                    x = torch.cat([x] * k)  # cat, not repeat: it keeps the latents' memory layout, and so the UNet's rounding
                out = self.family.forward(self, x, t[i : i + s].repeat(k), text, guidance)
                outs.append((out.clone() if self._graphs else out).unflatten(0, (k, s)))  # kept past the next call
        return torch.cat(outs, dim=1).flatten(0, 1)  # k blocks of n rows

    @property
    def _reusing(self) -> bool:
        """Whether a :meth:`feature_reuse` block is on."""
        return self._reuse is not None and self._reuse.active

    def feature_reuse(self, k: int, name: str = "cache_interval"):
        """A context in which each :meth:`predict` call is one step of a walk whose UNet runs in full every k-th step
        and reuses its deep features in between (stages/reuse.py); k = 1: every step in full. ``name``: the option
        that asked for it, for the error."""
        if k == 1:
            return contextlib.nullcontext()
        if self._reuse is None:
            raise ValueError(f"Feature reuse (`{name}` {k}) needs a UNet of the SD or SDXL kind; "
                             f"{self.family.name}'s denoiser is {type(self.denoiser).__name__}.")
        return self._reuse.every(k)

    def unet_forward(self, x_RChw, t_R, text_RLD, added=None) -> torch.Tensor:
        """The UNet's output (SD, SDXL families), through feature reuse when a :meth:`feature_reuse` block is on."""
        if self._reusing:
            return self._reuse(x_RChw, t_R, text_RLD, added)
        return self.denoiser(x_RChw, t_R, encoder_hidden_states=text_RLD, added_cond_kwargs=added).sample

    def _attention_kernel(self):
        if self.attention is None:
            return contextlib.nullcontext()
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"`attention` must be one of {', '.join(ATTENTION_BACKENDS)} or None but is {self.attention!r}.")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, ATTENTION_BACKENDS[self.attention]))

    def compile(self, mode: str | None = None, vae: bool = True) -> "DiffEditModel":
        """``torch.compile`` the denoiser and (with ``vae``, the default) the VAE's encoder and decoder in place, static shapes.

        In place (``nn.Module.compile``), so weights keep their names; a part already compiled keeps its graphs,
        so ``compile()`` after ``compile(vae=False)`` adds the VAE alone. Each distinct batch size compiles once. A
        job keeps its batches the same size (its actor pads a short batch), so an actor compiles its graphs
        (mask, encoding and decoding batches) once and reuses them. On an H200 at SD 1.5 scale this took about a
        minute and the engine ran at about 50% of its FLOP floor; compiling the VAE too made a batch of 32 edits
        2.5% faster and cut its peak memory from 18.2 to 12.2 GiB (docs/BENCHMARKS.md).
        """
        parts = {"denoiser": self.denoiser}
        self._graphs = self._graphs or mode == "reduce-overhead"
        if vae:
            parts.update(vae_encoder=self.vae.encoder, vae_decoder=self.vae.decoder)
        for name, module in parts.items():
            if name not in self._compiled:
                module.compile(dynamic=False, mode=mode)
                if name == "denoiser" and self._reuse is not None:
                    self._reuse.compile(mode)  # the split forward of feature reuse, compiled when first used
                self._compiled.add(name)
        return self

    def to_fp8(self) -> "DiffEditModel":
        """The denoiser's linear layers in float8 (e4m3) with dynamic scaling, by torchao's inference recipe
        (``Float8DynamicActivationFloat8WeightConfig``): each weight scaled once, each activation at every call from
        its absolute maximum; per row in bf16, per tensor in fp16 (PyTorch's row-wise fp8 matmul returns bf16 only).
        Convolutions, normalisations and attention (SDPA) keep the model's dtype. Needs a CUDA GPU of compute
        capability 8.9 or more (Ada, Hopper, Blackwell) and torchao; call before :meth:`compile`.
        """
        if self.device.type != "cuda" or torch.cuda.get_device_capability(self.device) < (8, 9):
            raise ValueError("fp8 needs a CUDA GPU of compute capability 8.9 or more (Ada, Hopper, Blackwell); "
                             f"this model runs on {self.device}.")
        if self.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"fp8 needs a model in fp16 or bf16, not {self.dtype}.")
        try:
            from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor,
                                              quantize_)
        except ImportError as exc:
            raise ValueError("fp8 needs torchao (pip install 'diffedit[fp8]').") from exc
        granularity = PerRow() if self.dtype == torch.bfloat16 else PerTensor()
        # set_inductor_config=False: torchao's default turns on Inductor's coordinate-descent tuning of every kernel
        # (an SD 1.5 compile did not finish inside a ten-minute command) and TF32 matmuls, for the whole process.
        config = Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False)
        quantize_(self.denoiser, config, filter_fn=fp8_able)
        return self

    # -- identity ---------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 over every weight tensor (names, shapes, bytes) and the scheduler config: which weights made an edit."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            modules = sorted((k, v) for k, v in self.parts.items() if isinstance(v, torch.nn.Module))
            for name, module in modules:
                for key, tensor in sorted(module.state_dict().items()):
                    h.update(f"{name}.{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                    h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            h.update(json.dumps(self.scheduler_config, sort_keys=True, default=str).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def fp8_able(module: torch.nn.Module, name: str = "") -> bool:
    """A linear layer whose sides fp8 matmuls take (multiples of 16). A 128 x 128 weight is left out: torchao
    0.17 takes a per-tensor scale of that shape for its 128 x 128 block scaling and refuses the matmul."""
    return (isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0
            and module.out_features % 16 == 0 and (module.in_features, module.out_features) != (128, 128))


def load_model(model: str | Path, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               max_batch: int | None = None) -> DiffEditModel:
    """Load a diffusers model of a supported family from a local folder or a hub id.

    Stable Diffusion 1.x/2.x (epsilon or v-prediction), SDXL, Stable Diffusion 3.x (with or without its T5) and
    FLUX.1 (dev or schnell); the family comes from model_index.json. ``max_batch`` caps the rows of one denoiser
    call (:attr:`DiffEditModel.max_batch`). Raises :class:`ModelLoadError` naming what is missing, or why the
    weights or the family were refused.
    """
    # 1. Where the weights run, where they come from, and which family's code runs them.
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path = Path(model).expanduser()
    is_local = not is_hub_id(model)
    source = str(path.resolve()) if is_local else str(model)  # a hub id such as "stable-diffusion-v1-5/stable-diffusion-v1-5"
    if is_local:
        check_model_folder(path)
    index = _model_index(source, path, is_local, model)
    name = check_family(index, f"Model {model}")

    # 2. The components, safetensors only; then the checks that need the scheduler config.
    parts, scheduler_config = _load_components(name, index, source, dtype, model, path, is_local)
    if FAMILY_CODE[name].schedule_kind == "ddim" and scheduler_config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"Unsupported prediction_type {scheduler_config['prediction_type']!r}.")

    # 3. Edit defaults: the family's, then the folder's own recommendations (diffedit.json), if any.
    recommended = family_defaults(name, dict(parts[FAMILIES[name].denoiser].config))
    if is_local and (path / RECOMMENDED_DEFAULTS_FILE).is_file():
        recommended.update(json.loads((path / RECOMMENDED_DEFAULTS_FILE).read_text()))

    # 4. Frozen, in eval mode, on the device.
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.to(device).eval().requires_grad_(False)
    return DiffEditModel(FAMILY_CODE[name], parts, index, scheduler_config, source, device, dtype, recommended,
                         max_batch=max_batch)


def _model_index(source: str, path: Path, is_local: bool, model) -> dict:
    """model_index.json, from the folder or the hub."""
    try:
        if is_local:
            return json.loads((path / "model_index.json").read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "model_index.json")).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not read model_index.json of {model!r}: {exc}".strip()
            + ("" if is_local else f" (no local folder {path} exists, and a hub id needs network access and safetensors weights on the hub).")
        ) from exc


def _load_components(family: str, index: dict, source: str, dtype: torch.dtype, model, path: Path,
                     is_local: bool) -> tuple[dict, dict]:
    """({folder: module or tokenizer}, scheduler_config) from ``source``; a :class:`ModelLoadError` if any fails."""
    from diffusers import DDIMScheduler

    parts = {}
    try:
        for folder in family_components(family, index):
            if folder != "scheduler":
                parts[folder] = _load_part(FAMILY_CODE[family].classes[folder], source, folder, dtype)
        scheduler_config = dict(DDIMScheduler.load_config(source, subfolder="scheduler"))
    except (OSError, EnvironmentError) as exc:
        where = "folder" if is_local else "hub id"
        raise ModelLoadError(
            f"Could not load the model {where} {model!r}: {exc}".strip()
            + ("" if is_local else f" (no local folder {path} exists, and a hub id needs network access and safetensors weights on the hub).")
        ) from exc
    vae = parts["vae"]
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) and family == "sdxl":
        vae.to(torch.float32)  # SDXL's VAE overflows in fp16: diffusers' pipelines upcast it (force_upcast)
    return parts, scheduler_config


def _load_part(class_path: str, source: str, folder: str, dtype: torch.dtype):
    """One component by its class ("diffusers.AutoencoderKL"): weights from safetensors in ``dtype``."""
    library, name = class_path.split(".")
    cls = getattr(importlib.import_module(library), name)
    if name.endswith(("Tokenizer", "TokenizerFast")):
        return cls.from_pretrained(source, subfolder=folder)
    dtype_arg = "torch_dtype" if library == "diffusers" else "dtype"
    return cls.from_pretrained(source, subfolder=folder, use_safetensors=True, **{dtype_arg: dtype})
