"""Which UNet execution is fastest at SD 1.5 scale? Times one UNet forward at a fixed batch, per variant.

    python bench/unet_variants.py [--out bench/results] [--batch 64] [--variants eager,compile,compile+bench,...]
        [--profile]

A variant is ``eager`` or options joined by ``+``:
  compile   torch.compile (default mode, static shapes)
  cl        channels_last weights and input
  cudnn     SDPA restricted to cuDNN attention
  bench     torch.backends.cudnn.benchmark = True (cuDNN times its conv algorithms per shape)
  freeze    inductor's freezing (weights become constants: conv weights pre-laid-out, folded)
  qkv       diffusers' fuse_qkv_projections() (one matmul for q, k, v)
  tuned     inductor conv_1x1_as_mm + coordinate_descent_tuning
  gemmtune  inductor max_autotune_gemm (Triton GEMM templates, epilogues fused; convs stay cuDNN) + conv_1x1_as_mm
  autotune  mode="max-autotune-no-cudagraphs"
  graphs    mode="reduce-overhead" (CUDA graphs)
Prints TFLOP/s per variant (FLOPs from torch.utils.flop_counter); with ``--profile``, where the GPU time of
one forward goes, by kernel family. ``first 3 calls`` (warmup_s) is the compile time, or the autotuning; ms per
forward is the median of ``--repeats`` calls after them. Writes unet_variants_<device>.json under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch

from harness import add_out_argument, kernel_breakdown, result_path, sd15_unet, timed, write_result

OPTIONS = {"compile", "cl", "cudnn", "bench", "freeze", "qkv", "tuned", "gemmtune", "autotune", "graphs"}


def build_unet(variant: str, device, dtype):
    """(UNet, callable to time, input layout transform, context to close) for one variant of SD 1.5's UNet (random weights)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    opts = set() if variant == "eager" else set(variant.split("+"))
    unknown = opts - OPTIONS
    if unknown:
        raise SystemExit(f"Unknown variant option(s) {sorted(unknown)}; choose from {sorted(OPTIONS)}.")
    unet = sd15_unet().to(device, dtype).eval().requires_grad_(False)
    if "qkv" in opts:
        unet.fuse_qkv_projections()
    layout = lambda x: x  # noqa: E731
    if "cl" in opts:
        unet = unet.to(memory_format=torch.channels_last)
        layout = lambda x: x.to(memory_format=torch.channels_last)  # noqa: E731
    torch.backends.cudnn.benchmark = "bench" in opts
    inductor = torch._inductor.config
    patches = {}
    if "freeze" in opts:
        patches["freezing"] = True
    if "tuned" in opts:
        patches.update(conv_1x1_as_mm=True, coordinate_descent_tuning=True)
    if "gemmtune" in opts:
        patches.update(max_autotune_gemm=True, max_autotune_conv_backends="ATEN", conv_1x1_as_mm=True)
    ctx = contextlib.ExitStack()
    ctx.enter_context(inductor.patch(patches))
    if "cudnn" in opts:
        ctx.enter_context(sdpa_kernel([SDPBackend.CUDNN_ATTENTION]))
    compiled = bool(opts & {"compile", "freeze", "tuned", "gemmtune", "autotune", "graphs"})
    mode = "max-autotune-no-cudagraphs" if "autotune" in opts else "reduce-overhead" if "graphs" in opts else None
    run = torch.compile(unet, dynamic=False, mode=mode) if compiled else unet
    return unet, run, layout, ctx


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_argument(p)
    p.add_argument("--batch", default="64", help="one or more batch sizes, comma-separated")
    p.add_argument("--variants", default="eager,compile,compile+cl,compile+bench,freeze,compile+qkv,tuned")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="also break one forward's GPU time down by kernel family")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    args = p.parse_args(argv)
    from torch.utils.flop_counter import FlopCounterMode

    dev, dt = torch.device("cuda"), {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    rows, flops = [], {}
    for variant in args.variants.split(","):
        unet, run, layout, ctx = build_unet(variant, dev, dt)
        for batch in [int(b) for b in args.batch.split(",")]:
            x = torch.randn(batch, 4, 64, 64, device=dev, dtype=dt)
            t = torch.full((batch,), 500, device=dev)
            e = torch.randn(batch, 77, 768, device=dev, dtype=dt)
            xin = layout(x)
            forward = lambda: run(xin, t, encoder_hidden_states=e)  # noqa: E731
            with torch.no_grad():  # ctx (inductor patches, SDPA backend) stays entered until the variant ends
                if batch not in flops:
                    with FlopCounterMode(display=False) as fc:
                        unet(x, t, encoder_hidden_states=e)
                    flops[batch] = fc.get_total_flops()
                timing = timed(forward, dev, warmup=3, repeats=args.repeats)
                row = dict(variant=variant, batch=batch, dtype=args.dtype, ms=timing.steady_s * 1e3,
                           tflops=flops[batch] / timing.steady_s / 1e12, warmup_s=timing.first_s)
                if args.profile:
                    row["profile"] = kernel_breakdown(forward)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_result(result_path("unet_variants", args.out, dev), dev, rows=rows)
        ctx.close()
        run = unet = None  # free the variant's weights and graphs before the next
        torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
