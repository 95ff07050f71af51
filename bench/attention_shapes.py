"""How fast is SD 1.5's attention, shape by shape, per SDPA kernel? And what does its head size of 40 cost?

    bash bench/on_gpu.sh python3 bench/attention_shapes.py --out $OUT [--batch 64] [--backends flash,cudnn,efficient]

The profile of docs/BENCHMARKS.md puts a quarter of an edit's GPU time in attention, at a third of the matmul
rate. This times ``scaled_dot_product_attention`` alone at the UNet's self-attention shapes (8 heads; 4096
tokens of head size 40 on the 64 x 64 latent grid, 1024 of 80, 256 and 64 of 160) and at the same shapes with
the head size padded to the next size the kernels are built for (64, 128, 192): equal times mean the kernel
already pays for the padding. Rates count the useful work only, 4 x tokens^2 x head size FLOPs per head
(QK^T and PV). Seconds-long; prints a table and writes attention_shapes.json under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# (latent grid, tokens, head size) of SD 1.5's self-attention layers; 8 heads each (attention_head_dim 8).
SHAPES = [("64x64", 4096, 40), ("32x32", 1024, 80), ("16x16", 256, 160), ("8x8", 64, 160)]
HEADS = 8
PADDED = {40: 64, 80: 128, 160: 192}


def time_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls, timed with CUDA events after a warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=64, help="images per call (the engine's UNet batch)")
    p.add_argument("--backends", default="flash,cudnn,efficient")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from diffedit.stages.model import ATTENTION_BACKENDS

    dev, dt = torch.device("cuda"), torch.float16
    rows = []
    for grid, tokens, head in SHAPES:
        for size in (head, PADDED[head]):
            q, k, v = (torch.randn(args.batch, HEADS, tokens, size, device=dev, dtype=dt) for _ in range(3))
            useful = 4 * args.batch * HEADS * tokens**2 * head  # FLOPs of the unpadded attention
            for backend in args.backends.split(","):
                row = dict(grid=grid, tokens=tokens, head_size=head, run_at=size, backend=backend)
                try:
                    with sdpa_kernel(getattr(SDPBackend, ATTENTION_BACKENDS[backend])):
                        ms = time_ms(lambda: sdpa(q, k, v), args.repeats)
                    row.update(ms=ms, useful_tflops=useful / ms / 1e9)
                except RuntimeError as exc:  # a backend that does not take this shape
                    row.update(error=str(exc).splitlines()[0][:160])
                rows.append(row)
                print(json.dumps(row), flush=True)
    (args.out / "attention_shapes.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                                    torch=torch.__version__, batch=args.batch,
                                                                    rows=rows), indent=1))
    print("\n| grid | tokens | head | run at | backend | ms | useful TFLOP/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        timing = f"{r['ms']:.2f} | {r['useful_tflops']:.0f}" if "ms" in r else f"- | {r['error']}"
        print(f"| {r['grid']} | {r['tokens']} | {r['head_size']} | {r['run_at']} | {r['backend']} | {timing} |")


if __name__ == "__main__":
    main()
