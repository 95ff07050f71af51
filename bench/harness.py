"""What every benchmark in bench/ shares: one timer, one model builder, one result writer, one file name per device.

    from harness import timed, build_model, write_result, result_path   # bench/ is on sys.path in its scripts

- ``timed(fn, device, warmup=, repeats=)``: first-call and steady seconds of ``fn``, CUDA-synchronised on a GPU.
- ``build_model(kind, device, dtype, workdir)``: ``"sd15"``, Stable Diffusion 1.5's architecture (UNet, VAE, CLIP
  ViT-L/14 text tower) built from its configs with random weights: a diffusion model's work does not depend on
  its weight values; or ``"tiny"``, the test suite's tiny model (``diffedit.shapes.tiny``). ``model_folder`` saves
  one as a diffusers folder, for the job to load like any checkpoint.
- ``write_result(path, device, **numbers)``: JSON of the numbers with the device name, package versions, the
  command line, the date and the commit; ``result_path(name, out, device)`` names it ``<name>_<device>.json``.
- Inputs: the prompt pair of the SD-scale benchmarks and WebDataset shards of random images.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import io
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "diffusers", "transformers", "ray", "triton", "open_clip_torch", "lpips", "webdataset", "numpy")
MODELS = ("sd15", "tiny")

SOURCE = "a photo of a dog sitting on a red sofa in a living room"
TARGET = "a photo of a cat sitting on a red sofa in a living room"

# Stable Diffusion 1.x's DDIM settings (scaled_linear betas, steps_offset 1), as its scheduler_config.json has them.
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


# -- the timer ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    first_s: float | None  # the warm-up calls together (compilation, autotuning, caches); None without warm-up
    steady_s: float  # median seconds of one call after the warm-up
    peak_gib: float | None  # peak GPU memory allocated by PyTorch over all the calls; None off the GPU
    result: object = None  # what the last call returned


def timed(fn: Callable[[], object], device: torch.device | str | None = None, *, warmup: int = 1,
          repeats: int = 1) -> Timing:
    """Call ``fn`` ``warmup`` times, then ``repeats`` times, and say how long that took.

    On a CUDA device each call is bracketed by CUDA events after a synchronise, so a time runs from the call's
    start to its last kernel's end (the call's wall time, without the host's synchronise overhead: exact for
    kernels of tens of microseconds too); elsewhere ``time.perf_counter``. ``warmup=0, repeats=1`` times one
    call (a whole job, say). The peak memory counts from this call on.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"`repeats` must be >= 1 and `warmup` >= 0 but are {repeats} and {warmup}.")
    device = torch.device(device) if device is not None else None
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    def one_call():
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, out
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    first = sum(one_call()[0] for _ in range(warmup)) if warmup else None
    times, out = [], None
    for _ in range(repeats):
        seconds, out = one_call()
        times.append(seconds)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return Timing(first_s=first, steady_s=statistics.median(times), peak_gib=peak, result=out)


# -- the models -----------------------------------------------------------------------------------------------


def sd15_unet():
    """SD 1.5's UNet with random weights: diffusers' UNet2DConditionModel defaults are SD 1.x's (blocks 320, 640,
    1280, 1280; 2 layers per block; attention_head_dim 8); SD 1.5 adds cross_attention_dim 768, sample_size 64."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)


def sd15_model(device, dtype, workdir: Path, max_batch: int | None = None):
    """SD 1.5's UNet, VAE and CLIP ViT-L/14 text tower with random weights, as a DiffEditModel."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffedit.shapes.tiny import write_clip_tokenizer
    from diffedit.stages.families import FAMILY_CODE
    from diffedit.stages.model import DiffEditModel

    words = SOURCE.split() + TARGET.split()
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(workdir / "tokenizer", words))
    unet = sd15_unet()
    # SD's VAE: 128/256/512/512 channels, 2 layers per block, 4 latent channels, scaling 0.18215.
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512, scaling_factor=0.18215)
    # CLIP ViT-L/14's text tower.
    text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(text)
    for module in (unet, vae, text_encoder):
        module.to(device, dtype).eval().requires_grad_(False)
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    return DiffEditModel(FAMILY_CODE["sd"], parts, {"_class_name": "StableDiffusionPipeline"}, dict(SD15_SCHEDULER),
                         "sd15-random", torch.device(device), dtype, max_batch=max_batch)


def model_folder(kind: str, folder: Path) -> Path:
    """The ``kind`` model saved as a diffusers folder under ``folder`` (built once; fp16 weights for sd15)."""
    from diffedit.shapes.tiny import build_tiny_model, save_sd_folder

    check_kind(kind)
    out = folder / kind
    if (out / "model_index.json").is_file():
        return out
    if kind == "tiny":
        return build_tiny_model(out)
    from diffusers import DDIMScheduler

    m = sd15_model(torch.device("cpu"), torch.float16, folder / "_work")
    return save_sd_folder(out, vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                          scheduler=DDIMScheduler(**m.scheduler_config))


def build_model(kind: str, device, dtype, workdir: Path, max_batch: int | None = None):
    """A DiffEditModel of ``kind`` (one of MODELS) on ``device``; ``max_batch`` caps the rows of one UNet call."""
    from diffedit.stages.model import load_model

    check_kind(kind)
    if kind == "sd15":
        return sd15_model(device, dtype, workdir, max_batch=max_batch)
    return load_model(model_folder(kind, workdir), device=device, dtype=dtype, max_batch=max_batch)


def check_kind(kind: str) -> None:
    if kind not in MODELS:
        raise ValueError(f"`kind` must be one of {', '.join(MODELS)} but is {kind!r}.")


def diffusers_pipeline(model):
    """diffusers' StableDiffusionDiffEditPipeline over ``model``'s components (the reference we compare with)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline

    pipe = StableDiffusionDiffEditPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.scheduler_config),
        inverse_scheduler=DDIMInverseScheduler.from_config(model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- the results ----------------------------------------------------------------------------------------------


def device_name(device=None) -> str:
    """The GPU's name (torch.cuda.get_device_name), or "cpu"."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_slug(device=None) -> str:
    """The device in a file name: "NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3", "cpu"."""
    name = re.sub(r"^nvidia\s+", "", device_name(device).lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cpu"


def result_path(name: str, out: Path = RESULTS, device=None, suffix: str = ".json") -> Path:
    """Where a run of benchmark ``name`` on ``device`` writes: ``out/<name>_<device slug><suffix>``."""
    return Path(out) / f"{name}_{device_slug(device)}{suffix}"


def environment(device=None) -> dict:
    """What a result was measured on and with: device, versions, the command line, the date, the commit."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    versions["torch"] = torch.__version__  # the build (+cu130) too
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(device=device_name(device), cpus=os.cpu_count(), python=platform.python_version(), packages=versions,
                command=shlex.join(["python", *sys.argv]), date=datetime.date.today().isoformat(), commit=commit)


def write_result(path: Path, device=None, **numbers) -> Path:
    """Write ``{"env": environment(device), **numbers}`` as JSON at ``path`` (whole: a temporary file renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(env=environment(device), **numbers), indent=1, default=str))
    tmp.replace(path)
    return path


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for the result, named <benchmark>_<device>.json (default: bench/results)")


# -- the inputs -----------------------------------------------------------------------------------------------


def write_shards(folder: Path, images: int, *, size: tuple[int, int], image_format: str, caption: str,
                 rule: tuple[str, str], per_shard: int) -> str:
    """``images`` random RGB images of ``size`` (W, H) in WebDataset shards, with a caption each, and a rules file
    (``folder/rules.yaml``) with the one rule ``rule``; returns the shards' glob pattern."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    ext = {"JPEG": "jpg", "PNG": "png"}[image_format]
    for s in range((images + per_shard - 1) // per_shard):
        with wds.TarWriter(str(folder / f"bench-{s:06d}.tar")) as sink:
            for i in range(min(per_shard, images - s * per_shard)):
                buf = io.BytesIO()
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buf, image_format, **({"quality": 90} if image_format == "JPEG" else {}))
                sink.write({"__key__": f"{s:06d}-{i:05d}", ext: buf.getvalue(), "txt": caption})
    (folder / "rules.yaml").write_text(f"rules:\n  - from: {rule[0]}\n    to: {rule[1]}\n")
    return str(folder / "bench-*.tar")


# -- where GPU time goes --------------------------------------------------------------------------------------

KERNEL_FAMILIES = [  # first match wins; matched against the lower-cased kernel name
    # inductor's generated kernels (pointwise and reductions: norms, activations, layout changes fused);
    # first, since their names list the fused ops ("..._convolution_..._group_norm_permute_silu_...")
    ("inductor fused (triton)", r"^triton_"),
    ("attention", r"flash|fmha|attention|attn|sdpa"),
    ("layout", r"nchwtonhwc|nhwctonchw|transpose|permute"),
    ("conv", r"conv|fprop|implicit_gemm|xmma_fprop|winograd|dgrad"),
    ("gemm", r"gemm|nvjet|cutlass|cublas|sm90_xmma|matmul"),
    ("norm", r"group_norm|groupnorm|native_group|layer_norm|rowwisemoments|welford"),
    ("memcpy/other", r"."),
]


def kernel_family(name: str) -> str:
    low = name.lower()
    return next(family for family, pattern in KERNEL_FAMILIES if re.search(pattern, low))


def kernel_breakdown(fn, repeats: int = 2) -> dict:
    """GPU kernel time of ``fn`` (per call), by family, with the top kernels: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    by_family, by_kernel = defaultdict(float), defaultdict(float)
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if evt.device_type.name != "CUDA" or not us:
            continue
        by_family[kernel_family(evt.key)] += us / repeats / 1e3
        by_kernel[evt.key] += us / repeats / 1e3
    ranked = sorted(by_kernel.items(), key=lambda kv: -kv[1])
    per_family = defaultdict(list)
    for name, ms in ranked:
        if len(per_family[kernel_family(name)]) < 4:
            per_family[kernel_family(name)].append((name[:110], round(ms, 2)))
    return dict(gpu_ms=sum(by_family.values()),
                families={k: round(v, 2) for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])},
                top_kernels=dict(per_family))
