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

    bash bench/on_gpu.sh python3 bench/bench_gpu.py --compile --skip-eager \
        --our-sizes 32 --compiled-variants per-row,shared,vae,qkv
    python bench/bench_gpu.py --tiny --out /tmp/b --diffusers-sizes 1,2 --our-sizes 2    # a smoke run on CPU

With ``--compile``, the engine is compiled (the UNet: ``DiffEditModel.compile(vae=False)``) and (b) is timed after
each of ``--compiled-variants`` in turn, applied cumulatively (default: the UNet's prompt-independent first layers
per row, then shared as the engine does, then the VAE compiled too, which is the engine's ``compile()``); (d)
after the last one only, unless ``--paper-variants all``. ``--profile`` then breaks one (b) call down by phase and
by GPU kernel family. Writes bench_gpu_<device>.json and .md (and bench_gpu_profile_<device>.json) under --out;
docs/BENCHMARKS.md's first table came from the first command (516 s on one H200).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness import (SOURCE, TARGET, add_out_argument, build_model, diffusers_pipeline, environment, kernel_breakdown,
                     result_path, timed, write_result)

from diffedit.stages.config import EditConfig
from diffedit.stages.editor import edit_batch
from diffedit.stages.images import images_to_tensor
from diffedit.stages.model import DTYPES, DiffEditModel
from diffedit.stages.randomness import edit_seed


def matmul_rate(device, dtype) -> float | None:
    """Measured dense matmul FLOP/s at this dtype: the rate the FLOP floor is taken from."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    return 2 * 8192**3 / timed(lambda: a @ b, device, warmup=3, repeats=20).steady_s


def run_diffusers(pipe, images):
    """diffusers' documented DiffEdit usage, with its defaults, on a list of images."""
    n = len(images)
    mask = pipe.generate_mask(image=images, source_prompt=[SOURCE] * n, target_prompt=[TARGET] * n)
    inv = pipe.invert(prompt=[SOURCE] * n, image=images).latents
    return pipe(prompt=[TARGET] * n, mask_image=mask, image_latents=inv, output_type="pt").images


def run_ours(model, x, config):
    n = x.shape[0]
    seeds = [edit_seed(0, f"img{i}", 0) for i in range(n)]
    return edit_batch(model, x, [SOURCE] * n, [TARGET] * n, seeds, config).edited_BCHW


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def phase_profile(model, fn, device) -> dict:
    """Where one call of ``fn`` spends its time: synced wall time per model method, GPU kernel time by family."""
    spent, calls = {}, {}
    originals = {name: getattr(model, name) for name in ("predict", "encode_images", "decode_latents", "encode_text")}

    def timed_method(name, method):
        def wrapper(*a, **k):
            t = timed(lambda: method(*a, **k), device, warmup=0)
            spent[name] = spent.get(name, 0.0) + t.steady_s
            calls[name] = calls.get(name, 0) + 1
            return t.result
        return wrapper

    for name, method in originals.items():
        setattr(model, name, timed_method(name, method))
    try:
        total = timed(fn, device, warmup=0).steady_s
    finally:
        for name in originals:
            delattr(model, name)  # back to the class's bound methods
    unsynced = timed(fn, device, warmup=0).steady_s
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
    add_out_argument(p)
    p.add_argument("--tiny", action="store_true", help="the tiny model instead of SD 1.5 (CPU smoke run)")
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES), help="on the GPU (fp32 on the CPU)")
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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype if device.type == "cuda" else "fp32"]
    workdir = Path(tempfile.mkdtemp(prefix="bench_gpu-"))
    model = build_model("tiny" if args.tiny else "sd15", device, dtype, workdir, max_batch=args.max_batch)
    res = model.resolution
    rng = np.random.default_rng(0)
    max_n = max(int(s) for s in (args.diffusers_sizes + "," + args.our_sizes).split(","))
    pil = [Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)) for _ in range(max_n)]
    x_all = images_to_tensor(pil, res).to(device, dtype)
    rate = matmul_rate(device, dtype)
    same_work = EditConfig.from_flat(conditional_encoding=True, encode_guidance=7.5)
    paper = EditConfig()
    rows = []
    setup = dict(dtype=str(dtype), matmul_tflops=rate / 1e12 if rate else None, max_batch=args.max_batch)
    print(json.dumps(dict(environment(device), **setup)), flush=True)

    def record(name, n, timing, flops_per_edit, compile_s=None):
        eps = n / timing.steady_s
        floor_s = flops_per_edit / rate if rate else None
        row = dict(variant=name, images_per_call=n, seconds=timing.steady_s, edits_per_s=eps,
                   first_call_s=timing.first_s, tflop_per_edit=flops_per_edit / 1e12,
                   floor_share=(floor_s * eps) if floor_s else None, peak_gib=timing.peak_gib, compile_s=compile_s)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_result(result_path("bench_gpu", args.out, device), device, **setup, rows=rows)
        write_table(result_path("bench_gpu", args.out, device, suffix=".md"), device, setup, rows, echo=False)

    with torch.no_grad():
        flops = {}  # (config name, prefix shared): FLOPs of one edit; sharing the prefix does less work
        for share in (True, False):
            model.share_prefix = share
            for config, key in ((same_work, "b"), (paper, "d")):
                flops[key, share] = count_flops(lambda: run_ours(model, x_all[:1], config))
        model.share_prefix = True
        print(json.dumps({f"tflop_per_edit_{k}_{'shared' if sh else 'per_row'}": v / 1e12 for (k, sh), v in flops.items()}))
        if not args.skip_diffusers:
            pipe = diffusers_pipeline(model)
            flops_diff = count_flops(lambda: run_diffusers(pipe, pil[:1]))
            for n in [int(s) for s in args.diffusers_sizes.split(",")]:
                timing = timed(lambda: run_diffusers(pipe, pil[:n]), device, repeats=2 if n == 1 else 1)
                record("(a) diffusers DiffEdit pipeline", n, timing, flops_diff)
        ours = ((same_work, "(b) ours, same work", "b"), (paper, "(d) ours, paper defaults", "d"))
        for config, name, key in ours:
            for n in [] if args.skip_eager else [int(s) for s in args.our_sizes.split(",")]:
                record(name, n, timed(lambda: run_ours(model, x_all[:n], config), device), flops[key, True])
        applied = []
        if args.compile:
            model.compile(vae=False)  # the engine's own path (DiffEditModel.compile, static shapes); the VAE: variant 'vae'
            n = max(int(s) for s in args.our_sizes.split(","))
            variants = args.compiled_variants.split(",") if args.compiled_variants else []
            for i, variant in enumerate(variants or [None]):
                if variant:
                    apply_variant(model, variant, device)
                    applied.append(variant)
                last = i == len(variants) - 1 or not variants
                for config, name, key in ours if last or args.paper_variants == "all" else ours[:1]:
                    timing = timed(lambda: run_ours(model, x_all[:n], config), device)
                    extra = timing.first_s - timing.steady_s  # compilation (or cuDNN's autotuning) on the first call
                    record(f"{name}, {variant_label(applied)}", n, timing, flops[key, model.share_prefix],
                           compile_s=extra if extra > 1 else None)
        if args.profile and device.type == "cuda":
            n = max(int(s) for s in args.our_sizes.split(","))
            prof = phase_profile(model, lambda: run_ours(model, x_all[:n], same_work), device)
            prof.update(variant="(b) ours, same work" + (f", {variant_label(applied)}" if args.compile else ""),
                        images_per_call=n)
            print(json.dumps(prof), flush=True)
            write_result(result_path("bench_gpu_profile", args.out, device), device, **prof)
    write_table(result_path("bench_gpu", args.out, device, suffix=".md"), device, setup, rows)


def write_table(path: Path, device, setup: dict, rows: list[dict], echo: bool = True):
    env = environment(device)
    lines = [f"device: {env['device']}; torch {env['packages']['torch']}; diffusers {env['packages'].get('diffusers')}; "
             f"{setup['dtype']}; measured matmul rate {setup['matmul_tflops'] and round(setup['matmul_tflops'])} TFLOP/s",
             f"command: {env['command']}", "",
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
    path.write_text("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
