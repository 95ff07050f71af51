"""How fast is SD 1.5's attention, shape by shape, per kernel? And what does its head size of 40 cost?

    bash bench/on_gpu.sh python3 bench/attention_shapes.py [--out bench/results] [--batch 64] [--dtype fp16]
        [--backends flash,cudnn,efficient,default]

The profile of docs/BENCHMARKS.md puts a quarter of an edit's GPU time in attention, at a third of the matmul
rate. This times each kernel alone at the UNet's attention shapes (8 heads; self-attention over 4096 tokens of
head size 40 on the 64 x 64 latent grid, 1024 of 80, 256 and 64 of 160; cross-attention to 77 text tokens at
each size), with q, k and v laid out as diffusers' processors make them ((B, L, H x D) viewed as (B, H, L, D)).
SDPA's kernels also run at the head size padded to the next size they are built for (64, 128, 192): equal times
mean the kernel already pays for the padding. ``default`` is PyTorch's own choice (no ``sdpa_kernel`` context), as
the engine's ``attention=None`` gets it; its row names the GPU kernel that ran. Rates count the useful work only,
4 x queries x keys x head size FLOPs per head (QK^T and PV). Each kernel's error against float32 attention is
reported at the true head size (largest, and relative in norm), with a count of output elements it left unwritten
(NaN). Seconds-long; prints a table and writes attention_shapes_<device>.json under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch

from harness import add_out_argument, result_path, timed, write_result

# (layer, queries, keys, head size) of SD 1.5's attention layers; 8 heads each (attention_head_dim 8).
SHAPES = [("self 64x64", 4096, 4096, 40), ("self 32x32", 1024, 1024, 80), ("self 16x16", 256, 256, 160),
          ("self 8x8", 64, 64, 160), ("cross 64x64", 4096, 77, 40), ("cross 32x32", 1024, 77, 80),
          ("cross 16x16", 256, 77, 160)]
HEADS = 8
PADDED = {40: 64, 80: 128, 160: 192}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def check(call, ref, q) -> dict:
    """``call()``'s error against ``ref`` (float32 attention on the first 4 images): the largest absolute one and
    ||out - ref|| / ||ref||. Its output block is first filled with NaN (a freed block of the same size is what the
    caching allocator hands out next), so an element the kernel never writes shows as NaN, not as an old value."""
    poison = torch.full((q.numel(),), float("nan"), dtype=q.dtype, device=q.device)
    del poison
    out = call()[:4].float()
    diff = out - ref
    return dict(max_error=diff.abs().max().item(), rel_error=(diff.norm() / ref.norm()).item(),
                unwritten=int(out.isnan().sum()))


def gpu_kernel(fn) -> str:
    """The name of the GPU kernel that ``fn`` spends most time in (which kernel PyTorch's default picks)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    return max(events, key=lambda e: e.device_time_total).key[:120] if events else "?"


def projections(batch: int, queries: int, keys: int, size: int, dtype, generator):
    """q, k, v as diffusers' AttnProcessor2_0 passes them to SDPA: (B, L, H x D) projections viewed as (B, H, L, D)."""
    dev = torch.device("cuda")
    q = torch.randn(batch, queries, HEADS * size, device=dev, dtype=dtype, generator=generator)
    k, v = (torch.randn(batch, keys, HEADS * size, device=dev, dtype=dtype, generator=generator) for _ in range(2))
    return [x.unflatten(-1, (HEADS, size)).transpose(1, 2) for x in (q, k, v)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_argument(p)
    p.add_argument("--batch", type=int, default=64, help="images per call (the engine's UNet batch)")
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    p.add_argument("--backends", default="flash,cudnn,efficient,default",
                   help="SDPA's backends by name, and `default` (PyTorch's own choice)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from diffedit.stages.model import ATTENTION_BACKENDS

    dtype = DTYPES[args.dtype]
    gen = torch.Generator("cuda").manual_seed(0)
    rows = []
    for layer, queries, keys, head in SHAPES:
        q, k, v = projections(args.batch, queries, keys, head, dtype, gen)
        # The reference: float32 attention on the first 4 images (enough to see a kernel's rounding).
        ref = sdpa(*(x[:4].float() for x in (q, k, v)))
        useful = 4 * args.batch * HEADS * queries * keys * head  # FLOPs of the unpadded attention
        inputs = {head: (q, k, v), PADDED[head]: projections(args.batch, queries, keys, PADDED[head], dtype, gen)}
        for backend in args.backends.split(","):
            for size, (qs, ks, vs) in inputs.items():
                row = dict(layer=layer, queries=queries, keys=keys, head_size=head, run_at=size, backend=backend)
                try:
                    call = lambda: sdpa(qs, ks, vs)  # noqa: E731
                    kernel = (contextlib.nullcontext() if backend == "default"  # PyTorch's own choice
                              else sdpa_kernel(getattr(SDPBackend, ATTENTION_BACKENDS[backend])))
                    with kernel:
                        if size == head:
                            row.update(check(call, ref, qs))
                        ms = timed(call, "cuda", warmup=3, repeats=args.repeats).steady_s * 1e3
                        if backend == "default":
                            row.update(kernel=gpu_kernel(call))
                    row.update(ms=ms, useful_tflops=useful / ms / 1e9)
                except RuntimeError as exc:  # a backend that does not take this shape
                    row.update(error=str(exc).splitlines()[0][:160])
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_result(result_path("attention_shapes", args.out, "cuda"), "cuda", batch=args.batch, dtype=args.dtype,
                 rows=rows)
    print(f"\nbatch {args.batch}, {HEADS} heads, {args.dtype}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("\n| layer | queries | keys | head | run at | backend | ms | useful TFLOP/s | error: max / relative |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        timing = f"{r['ms']:.3f} | {r['useful_tflops']:.0f}" if "ms" in r else f"- | {r['error']}"
        err = f"{r['max_error']:.1e} / {r['rel_error']:.1e}" if "max_error" in r else "-"
        if r.get("unwritten"):
            err += f", {r['unwritten']} NaN"
        if r.get("kernel"):
            err += f" (kernel: {r['kernel'][:60]})"
        print(f"| {r['layer']} | {r['queries']} | {r['keys']} | {r['head_size']} | {r['run_at']} | {r['backend']} | "
              f"{timing} | {err} |")


if __name__ == "__main__":
    main()
