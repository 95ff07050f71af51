"""GPU throughput of DiffEdit at Stable Diffusion 1.5 scale: diffusers' pipeline against our engine.

No pretrained weights exist here, but a diffusion model's work does not depend on its weight values:
this builds SD 1.5's exact architecture (UNet 320/640/1280/1280, cross-attention 768, SD's VAE, a CLIP
ViT-L/14 text encoder) with random weights and times, in one run:
  (a) diffusers' StableDiffusionDiffEditPipeline with its defaults (generate_mask -> invert -> __call__),
      one image per call and lists of 4, 8, 12 images;
  (b) our engine in-process doing the same work (conditional inversion with guidance 7.5);
  (d) our engine at the paper's defaults (unconditional encoding).
For each: edits/s, FLOPs per edit (torch.utils.flop_counter), share of the FLOP floor (FLOPs over the
measured fp16 matmul rate), peak GPU memory, compile time.

    WHEELS=.whl-bench bash bench/on_gpu.sh python3 bench/bench_gpu.py --out $OUT --compile --skip-eager \
        --our-sizes 32 --compiled-variants per-row,shared,vae,qkv
    python bench/bench_gpu.py --tiny --out /tmp/b --diffusers-sizes 1,2 --our-sizes 2    # a smoke run on CPU

With ``--compile``, the engine is compiled (the UNet: ``DiffEditModel.compile(vae=False)``) and (b) is timed after
each of ``--compiled-variants`` in turn, applied cumulatively (default: the UNet's prompt-independent first layers
per row, then shared as the engine does, then the VAE compiled too, which is the engine's ``compile()``); (d)
after the last one only, unless ``--paper-variants all``. ``--profile`` then breaks one (b) call down by phase and
by GPU kernel family. docs/BENCHMARKS.md's table came from the first line (516 s on one H200).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffedit.stages.config import EditConfig
from diffedit.stages.editor import edit_batch
from diffedit.stages.images import images_to_tensor
from diffedit.stages.model import DiffEditModel
from diffedit.stages.randomness import edit_seed
from diffedit.stages.tiny import write_clip_tokenizer

SOURCE = "a photo of a dog sitting on a red sofa in a living room"
TARGET = "a photo of a cat sitting on a red sofa in a living room"


def build_sd15(device, dtype, tiny: bool, workdir: Path):
    """SD 1.5's architecture with random weights (or a tiny stand-in for a CPU smoke run)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(workdir / "tokenizer", SOURCE.split() + TARGET.split()))
    torch.manual_seed(0)
    if tiny:
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=16,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, norm_num_groups=4)
        vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16)
        text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=77)
    else:
        # diffusers' UNet2DConditionModel defaults are SD 1.x's: block_out_channels (320, 640, 1280, 1280),
        # 2 layers per block, attention_head_dim 8; SD 1.5 uses cross_attention_dim 768, sample_size 64.
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        # SD's VAE: 128/256/512/512 channels, 2 layers per block, 4 latent channels, scaling 0.18215.
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512, scaling_factor=0.18215)
        # CLIP ViT-L/14's text tower.
        text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    text.bos_token_id, text.eos_token_id, text.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    text_encoder = CLIPTextModel(text)
    scheduler_config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    for module in (unet, vae, text_encoder):
        module.to(device, dtype).eval().requires_grad_(False)
    return DiffEditModel(unet, vae, text_encoder, tokenizer, scheduler_config, "sd15-random", device, dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def matmul_rate(device, dtype) -> float | None:
    """Measured dense matmul FLOP/s at this dtype: the rate the FLOP floor is taken from."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    sync(device)
    return 20 * 2 * 8192**3 / (time.perf_counter() - t)


def diffusers_pipe(model: DiffEditModel):
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline

    pipe = StableDiffusionDiffEditPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.scheduler_config),
        inverse_scheduler=DDIMInverseScheduler.from_config(model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers(pipe, images):
    """diffusers' documented DiffEdit usage, with its defaults, on a list of images."""
    n = len(images)
    mask = pipe.generate_mask(image=images, source_prompt=[SOURCE] * n, target_prompt=[TARGET] * n)
    inv = pipe.invert(prompt=[SOURCE] * n, image=images).latents
    return pipe(prompt=[TARGET] * n, mask_image=mask, image_latents=inv, output_type="pt").images


def run_ours(model, x, config, max_batch):
    n = x.shape[0]
    seeds = [edit_seed(0, f"img{i}", 0) for i in range(n)]
    return edit_batch(model, x, [SOURCE] * n, [TARGET] * n, seeds, config, max_batch=max_batch).edited_BCHW


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def timed(device, fn, repeats: int = 1) -> tuple[float, float]:
    """(first call seconds, median steady seconds over ``repeats`` further calls)."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return first, float(np.median(times)) if times else first


def phase_profile(model, fn, device) -> dict:
    """Where one call of ``fn`` spends its time: synced wall time per model method, GPU kernel time by family."""
    from unet_variants import kernel_breakdown  # bench/ is on sys.path when this script runs

    spent, calls = {}, {}
    originals = {name: getattr(model, name) for name in ("predict", "encode_images", "decode_latents", "encode_text")}

    def timed_method(name, method):
        def wrapper(*a, **k):
            sync(device)
            t = time.perf_counter()
            out = method(*a, **k)
            sync(device)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
            calls[name] = calls.get(name, 0) + 1
            return out
        return wrapper

    for name, method in originals.items():
        setattr(model, name, timed_method(name, method))
    try:
        total, _ = timed(device, fn, repeats=0)
    finally:
        for name in originals:
            delattr(model, name)  # back to the class's bound methods
    unsynced, _ = timed(device, fn, repeats=0)
    kernels = kernel_breakdown(fn, repeats=1)
    return dict(wall_s=unsynced, wall_synced_s=total, gpu_kernel_s=kernels["gpu_ms"] / 1e3,
                phases_s={k: round(v, 3) for k, v in spent.items()}, calls=calls,
                other_s=round(total - sum(spent.values()), 3), kernel_families_ms=kernels["families"],
                top_kernels=kernels["top_kernels"])


VARIANTS = {  # applied one after the other: each adds to (or, for per-row/shared, switches) the ones before it
    "per-row": "the UNet's prompt-independent first layers run for every row (DiffEditModel.share_prefix = False)",
    "shared": "those layers run once per latent of a multi-prompt batch (share_prefix = True, the engine's default)",
    "vae": "the VAE's encoder and decoder compiled too (DiffEditModel.compile()'s default)",
    "qkv": "diffusers' fuse_qkv_projections(): one matmul for q, k, v (k, v in cross-attention); recompiles",
    "cudnn-bench": "torch.backends.cudnn.benchmark = True (cuDNN times its conv algorithms per shape)",
    "cudnn-attention": "the UNet's attention on cuDNN's fused kernel (DiffEditModel.attention = 'cudnn'); recompiles",
}


def apply_variant(model: DiffEditModel, variant: str, device) -> None:
    """Switch the compiled engine to ``variant``, on top of the ones applied before it."""
    if variant not in VARIANTS:
        raise SystemExit(f"Unknown compiled variant {variant!r}; choose from {', '.join(VARIANTS)}.")
    if variant in ("per-row", "shared"):
        model.share_prefix = variant == "shared"  # the hooks' copy count is guarded: new graphs, no reset needed
    elif variant == "cudnn-bench":
        torch.backends.cudnn.benchmark = True
    elif variant == "vae":
        model.compile()  # the VAE too (the engine's default); the UNet keeps its graphs
    elif variant == "qkv":
        model.unet.fuse_qkv_projections()
        torch._dynamo.reset()  # new modules and attention processors: trace again
    elif variant == "cudnn-attention":
        if device.type != "cuda":
            raise SystemExit("cudnn-attention needs a CUDA device.")
        model.attention = "cudnn"
        torch._dynamo.reset()  # the attention kernel is chosen when the UNet is traced: compile again


def variant_label(applied: list[str]) -> str:
    """The engine's state after ``applied``: 'compiled', then what differs from the engine's compiled default."""
    state = [v for v in applied if v not in ("per-row", "shared")]
    if applied and [v for v in applied if v in ("per-row", "shared")][-1:] == ["per-row"]:
        state.insert(0, "prefix per row")
    return ", ".join(["compiled"] + state)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="tiny stand-in models (CPU smoke run)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--diffusers-sizes", default="1,4,8,12")
    p.add_argument("--our-sizes", default="8,16,32")
    p.add_argument("--max-batch", type=int, default=64, help="our UNet micro-batch cap (bounds peak memory)")
    p.add_argument("--compile", action="store_true", help="also time our engine compiled (DiffEditModel.compile)")
    p.add_argument("--compiled-variants", default="per-row,shared,vae",
                   help="after compiling, variants applied one after the other (cumulative), each timed: " + "; ".join(
                       f"{k}: {v}" for k, v in VARIANTS.items()))
    p.add_argument("--paper-variants", default="last", choices=["last", "all"],
                   help="time (d) after the last compiled variant only (default; saves its compiles) or after each")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--skip-eager", action="store_true", help="time our engine compiled only (at the largest of --our-sizes)")
    p.add_argument("--profile", action="store_true",
                   help="after the timings, break one (b) call at the largest size down: time per phase, GPU kernels")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype if device.type == "cuda" else "fp32"]
    model = build_sd15(device, dtype, args.tiny, args.out / "work")
    res = model.resolution
    rng = np.random.default_rng(0)
    max_n = max(int(s) for s in (args.diffusers_sizes + "," + args.our_sizes).split(","))
    pil = [Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)) for _ in range(max_n)]
    x_all = images_to_tensor(pil, res).to(device, dtype)
    rate = matmul_rate(device, dtype)
    same_work = EditConfig.from_flat(conditional_encoding=True, encode_guidance=7.5)
    paper = EditConfig()
    rows = []
    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, python=platform.python_version(), dtype=str(dtype),
               matmul_tflops=rate / 1e12 if rate else None)
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    print(json.dumps(env), flush=True)

    def record(name, n, first, steady, flops_per_edit, mem, compile_s=None):
        eps = n / steady
        floor_s = flops_per_edit / rate if rate else None
        row = dict(variant=name, images_per_call=n, seconds=steady, edits_per_s=eps, first_call_s=first,
                   tflop_per_edit=flops_per_edit / 1e12, floor_share=(floor_s * eps) if floor_s else None,
                   peak_gib=mem, compile_s=compile_s)
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "bench_gpu.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
        write_table(args.out, env, rows, echo=False)

    with torch.no_grad():
        flops = {}  # (config name, prefix shared): FLOPs of one edit; sharing the prefix does less work
        for share in (True, False):
            model.share_prefix = share
            for config, key in ((same_work, "b"), (paper, "d")):
                flops[key, share] = count_flops(lambda: run_ours(model, x_all[:1], config, args.max_batch))
        model.share_prefix = True
        print(json.dumps({f"tflop_per_edit_{k}_{'shared' if sh else 'per_row'}": v / 1e12 for (k, sh), v in flops.items()}))
        if not args.skip_diffusers:
            pipe = diffusers_pipe(model)
            flops_diff = count_flops(lambda: run_diffusers(pipe, pil[:1]))
            for n in [int(s) for s in args.diffusers_sizes.split(",")]:
                peak_reset(device)
                first, steady = timed(device, lambda: run_diffusers(pipe, pil[:n]), repeats=2 if n == 1 else 1)
                record("(a) diffusers DiffEdit pipeline", n, first, steady, flops_diff, peak_gib(device))
        ours = ((same_work, "(b) ours, same work", "b"), (paper, "(d) ours, paper defaults", "d"))
        for config, name, key in ours:
            for n in [] if args.skip_eager else [int(s) for s in args.our_sizes.split(",")]:
                peak_reset(device)
                first, steady = timed(device, lambda: run_ours(model, x_all[:n], config, args.max_batch), repeats=1)
                record(name, n, first, steady, flops[key, True], peak_gib(device))
        if args.compile:
            model.compile(vae=False)  # the engine's own path (DiffEditModel.compile, static shapes); the VAE: variant 'vae'
            n = max(int(s) for s in args.our_sizes.split(","))
            variants = args.compiled_variants.split(",") if args.compiled_variants else []
            applied = []
            for i, variant in enumerate(variants or [None]):
                if variant:
                    apply_variant(model, variant, device)
                    applied.append(variant)
                last = i == len(variants) - 1 or not variants
                for config, name, key in ours if last or args.paper_variants == "all" else ours[:1]:
                    peak_reset(device)
                    first, steady = timed(device, lambda: run_ours(model, x_all[:n], config, args.max_batch), repeats=1)
                    extra = first - steady  # compilation (or cuDNN's autotuning) on the first call
                    record(f"{name}, {variant_label(applied)}", n, first, steady, flops[key, model.share_prefix],
                           peak_gib(device), compile_s=extra if extra > 1 else None)
        if args.profile and device.type == "cuda":
            n = max(int(s) for s in args.our_sizes.split(","))
            prof = phase_profile(model, lambda: run_ours(model, x_all[:n], same_work, args.max_batch), device)
            prof.update(variant="(b) ours, same work" + (f", {variant_label(applied)}" if args.compile else ""),
                        images_per_call=n)
            print(json.dumps(prof), flush=True)
            (args.out / "bench_gpu_profile.json").write_text(json.dumps(prof, indent=1))
    write_table(args.out, env, rows)


def write_table(out: Path, env: dict, rows: list[dict], echo: bool = True):
    lines = [f"device: {env['device']}; torch {env['torch']}; diffusers {env.get('diffusers')}; {env['dtype']}; "
             f"measured matmul rate {env['matmul_tflops'] and round(env['matmul_tflops'])} TFLOP/s", "",
             "| variant | images/call | edits/s | TFLOP/edit | share of FLOP floor | peak GiB | compile s |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['variant']} | {r['images_per_call']} | {r['edits_per_s']:.2f} | {r['tflop_per_edit']:.1f} | "
                     f"{fmt(r['floor_share'], '.1%')} | {fmt(r['peak_gib'], '.1f')} | {fmt(r['compile_s'], '.0f')} |")
    a = max((r["edits_per_s"] for r in rows if r["variant"].startswith("(a)")), default=None)
    b = max((r["edits_per_s"] for r in rows if r["variant"].startswith("(b)")), default=None)
    if a and b:
        lines += ["", f"speedup: {b / a:.1f}x ((b) best over (a) best: {b:.2f} / {a:.2f} edits/s)"]
    (out / "bench_gpu.md").write_text("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
