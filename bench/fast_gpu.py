"""The speed flags at Stable Diffusion 1.5 scale, side by side with the engine's default and diffusers' best batched
DiffEdit pipeline, in one run.

    bash bench/on_gpu.sh python3 bench/fast_gpu.py                       # every flag, one H200
    python bench/fast_gpu.py --tiny --n 2 --diffusers-n 1 --out /tmp/f   # a smoke run on CPU

SD 1.5's architecture with random weights (bench/harness.py), fp16, 512 x 512, ``--n`` images per call, the
paper's defaults (unconditional encoding at r = 0.8, 10 mask samples, guidance 7.5), the engine compiled as the
job's ``--compile`` compiles it. Timed, in this order:
1. diffusers' StableDiffusionDiffEditPipeline with its defaults on ``--diffusers-n`` images per call (12 was its
   best batched size, docs/BENCHMARKS.md);
2. the engine at its defaults, then every edit flag of ``--variants`` (the same compiled graphs: steps, solver;
   feature reuse compiles its split UNet once);
3. each of ``--engine-variants``, which compile again: ``fp8`` (torchao, the denoiser's linear layers) and
   ``cudagraphs`` (``torch.compile`` mode ``reduce-overhead``), each timed at the defaults and at ``--preset fast``;
   with ``--no-compile``, fp8 runs eager (against the eager default).
A variant that fails is recorded with its error and the run goes on. Writes ``fast_gpu_<device>.json`` (after
every row) under --out and prints a markdown table; quality is bench/fast_gate.py's.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_gpu import run_diffusers, run_ours
from harness import add_out_argument, build_model, diffusers_pipeline, environment, result_path, timed, write_result

from diffedit.pipelines.config import PRESETS
from diffedit.stages.config import EditConfig
from diffedit.stages.images import images_to_tensor

FAST = PRESETS["fast"][1]
VARIANTS = {  # edit parameters over the paper's defaults
    "default": {},
    "steps 25": {"steps": 25},
    "steps 15": {"steps": 15},
    "dpm 50": {"solver": "dpm"},
    "dpm 25": {"solver": "dpm", "steps": 25},
    "dpm 15": {"solver": "dpm", "steps": 15},
    "reuse 2": {"cache_interval": 2},
    "reuse 3": {"cache_interval": 3},
    "reuse 5": {"cache_interval": 5},
    "reuse 3 + encoding": {"cache_interval": 3, "encode_cache_interval": 3},
    "dpm 25 + reuse 2": {"solver": "dpm", "steps": 25, "cache_interval": 2},
    "steps 25 + reuse 2": {"steps": 25, "cache_interval": 2},
    "preset fast": FAST,
}


def recompile(model, mode: str | None) -> None:
    """Compile the engine again from scratch (``torch.compile`` ``mode``), as a new actor would."""
    torch._dynamo.reset()
    for module in (model.denoiser, model.vae.encoder, model.vae.decoder):
        module._compiled_call_impl = None
    model._compiled.clear()
    model.compile(mode=mode)


def engine_variant(model, name: str, compile: bool) -> None:
    if name == "fp8":
        model.to_fp8()
        if compile:
            recompile(model, None)
    elif name == "cudagraphs":
        if not compile:
            raise ValueError("cudagraphs needs the engine compiled (leave out --no-compile).")
        recompile(model, "reduce-overhead")
    else:
        raise SystemExit(f"Unknown engine variant {name!r}: fp8 or cudagraphs.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny model instead of SD 1.5 (CPU smoke run)")
    p.add_argument("--n", type=int, default=32, help="images per engine call (default 32)")
    p.add_argument("--diffusers-n", type=int, default=12, help="images per diffusers call (default 12; 0: skip)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"from: {', '.join(VARIANTS)}")
    p.add_argument("--engine-variants", default="fp8,cudagraphs", help="fp8, cudagraphs (each compiles again)")
    p.add_argument("--engine-edits", default="default,preset fast", help="the edit variants each engine variant times")
    p.add_argument("--no-compile", action="store_true", help="time the engine eager (the CPU smoke run; fp8 eager)")
    p.add_argument("--dump-stacks", type=float, default=0, metavar="S",
                   help="print every thread's Python stack every S seconds (where a long compile spends its time; "
                        "faulthandler, which crashed once while printing a compile's stacks on an H200)")
    add_out_argument(p)
    args = p.parse_args(argv)
    if args.dump_stacks:
        faulthandler.dump_traceback_later(args.dump_stacks, repeat=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build_model("tiny" if args.tiny else "sd15", device, dtype, Path(tempfile.mkdtemp(prefix="fast_gpu-")),
                        max_batch=64)
    res, n = model.resolution, args.n
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)) for _ in range(max(n, args.diffusers_n))]
    x = images_to_tensor(pil[:n], res).to(device, dtype)
    rows, path = [], result_path("fast_gpu", Path(args.out), device)
    print(json.dumps(environment(device)), flush=True)

    def record(name, images, fn, **extra):
        t0 = time.time()
        try:
            timing = timed(fn, device)
            row = dict(variant=name, images_per_call=images, edits_per_s=images / timing.steady_s,
                       seconds=timing.steady_s, first_call_s=timing.first_s, peak_gib=timing.peak_gib, **extra)
        except Exception as exc:  # record it, go on with the others
            row = dict(variant=name, images_per_call=images, error=f"{type(exc).__name__}: {exc}"[:500],
                       traceback=traceback.format_exc(limit=4)[-1500:], **extra)
        row["wall_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        write_result(path, device, n=n, rows=rows)

    with torch.no_grad():
        if args.diffusers_n:
            pipe = diffusers_pipeline(model)
            record("diffusers DiffEdit pipeline", args.diffusers_n, lambda: run_diffusers(pipe, pil[: args.diffusers_n]))
            del pipe
        if not args.no_compile:
            model.compile()
        base = EditConfig()
        for name in [v for v in args.variants.split(",") if v]:
            config = base.replace(**VARIANTS[name])
            record(name, n, lambda: run_ours(model, x, config), params=VARIANTS[name])
        for engine in [v for v in args.engine_variants.split(",") if v]:
            try:
                engine_variant(model, engine, not args.no_compile)
            except Exception as exc:
                rows.append(dict(variant=engine, error=f"{type(exc).__name__}: {exc}"[:500]))
                print(json.dumps(rows[-1]), flush=True)
                continue
            for name in [v for v in args.engine_edits.split(",") if v]:
                config = base.replace(**VARIANTS[name])
                record(f"{engine}, {name}", n, lambda: run_ours(model, x, config), params=VARIANTS[name], engine=engine)
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    ref = next((r["edits_per_s"] for r in rows if r["variant"].startswith("diffusers") and "edits_per_s" in r), None)
    default = next((r["edits_per_s"] for r in rows if r["variant"] == "default" and "edits_per_s" in r), None)
    out = ["| variant | images/call | edits/s | x default | x diffusers | first call s | peak GiB |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "edits_per_s" not in r:
            out.append(f"| {r['variant']} | {r.get('images_per_call', '-')} | failed: {r['error'][:120]} | | | | |")
            continue
        eps = r["edits_per_s"]
        rel = lambda b: f"{eps / b:.2f}" if b else "-"  # noqa: E731
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        out.append(f"| {r['variant']} | {r['images_per_call']} | {eps:.2f} | {rel(default)} | {rel(ref)} | "
                   f"{r['first_call_s']:.1f} | {peak} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
