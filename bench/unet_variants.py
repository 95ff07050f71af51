"""Which UNet execution is fastest at SD 1.5 scale? Times one UNet forward at a fixed batch, per variant.

    python bench/unet_variants.py --out $OUT [--batch 64] [--variants eager,compile,...]

Variants: eager; compile (torch.compile default); compile-cl (channels_last + compile); compile-cudnn
(compile, SDPA restricted to cuDNN attention); autotune (mode="max-autotune-no-cudagraphs"); graphs
(mode="reduce-overhead", CUDA graphs). Prints TFLOP/s per variant (FLOPs from torch.utils.flop_counter).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variants", default="eager,compile,compile-cl,compile-cudnn,autotune")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    dev, dt = torch.device("cuda"), torch.float16
    x = torch.randn(args.batch, 4, 64, 64, device=dev, dtype=dt)
    t = torch.full((args.batch,), 500, device=dev)
    e = torch.randn(args.batch, 77, 768, device=dev, dtype=dt)
    rows = []
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).to(dev, dt).eval().requires_grad_(False)
        ctx = contextlib.nullcontext()
        xin = x
        if variant == "compile-cl":
            unet = unet.to(memory_format=torch.channels_last)
            xin = x.to(memory_format=torch.channels_last)
        if variant == "compile-cudnn":
            ctx = sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
        mode = {"autotune": "max-autotune-no-cudagraphs", "graphs": "reduce-overhead"}.get(variant)
        run = unet if variant == "eager" else torch.compile(unet, dynamic=False, mode=mode)
        with torch.no_grad(), ctx:
            if not rows:
                with FlopCounterMode(display=False) as fc:
                    unet(x, t, encoder_hidden_states=e)
                flops = fc.get_total_flops()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                run(xin, t, encoder_hidden_states=e)
            torch.cuda.synchronize()
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                run(xin, t, encoder_hidden_states=e)
            torch.cuda.synchronize()
            per = (time.perf_counter() - t0) / args.repeats
        row = dict(variant=variant, batch=args.batch, ms=per * 1e3, tflops=flops / per / 1e12, warmup_s=warm)
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "unet_variants.json").write_text(json.dumps(rows, indent=1))
        del run, unet
        torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
