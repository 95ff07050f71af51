"""Every configuration of diffedit's Triton attention kernel (stages/attention.py's CONFIGS), one by one, at each
attention shape of SD 1.5's UNet: its time, its error against float32 attention, or why it failed.

    bash bench/on_gpu.sh python3 bench/attention_configs.py --out $OUT [--batch 64] [--shapes 0,1] [--configs 0,3]

What the autotuner does at a shape's first call, but with the error of each configuration (not only the time of
the fastest), and with each configuration in a child process of its own: a kernel that faults leaves the CUDA
context unusable, so one faulty configuration cannot hide the others. It is the data to pin configurations per
shape from. Prints one JSON line per (configuration, shape) and writes attention_configs.json under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_shapes import DTYPES, HEADS, SHAPES, check, projections, time_ms  # noqa: E402


def run_config(index: int, shapes: list[int], batch: int, dtype, repeats: int) -> None:
    """In the child: configuration ``index`` at each shape; one JSON line each."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from diffedit.stages.attention import CONFIGS, launch

    config = CONFIGS[index]
    gen = torch.Generator("cuda").manual_seed(0)
    for i in shapes:
        layer, queries, keys, head = SHAPES[i]
        q, k, v = projections(batch, queries, keys, head, dtype, gen)
        ref = sdpa(*(x[:4].float() for x in (q, k, v)))
        call = lambda: launch(q, k, v, head ** -0.5, config)  # noqa: E731
        row = dict(config=index, config_text=str(config), layer=layer, **check(call, ref, q))
        ms = time_ms(call, repeats)
        row.update(ms=ms, useful_tflops=4 * batch * HEADS * queries * keys * head / ms / 1e9)
        print(json.dumps(row), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    p.add_argument("--shapes", default=None, help="indices into attention_shapes.SHAPES (default: all)")
    p.add_argument("--configs", default=None, help="indices into stages/attention.py's CONFIGS (default: all)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shapes = [int(i) for i in args.shapes.split(",")] if args.shapes else list(range(len(SHAPES)))
    if args.child is not None:
        return run_config(args.child, shapes, args.batch, DTYPES[args.dtype], args.repeats)

    from diffedit.stages.attention import CONFIGS

    configs = [int(i) for i in args.configs.split(",")] if args.configs else list(range(len(CONFIGS)))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in configs:
        cmd = [sys.executable, __file__, "--out", str(args.out), "--batch", str(args.batch), "--dtype", args.dtype,
               "--shapes", ",".join(map(str, shapes)), "--repeats", str(args.repeats), "--child", str(index)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        rows += got
        for row in got:
            print(json.dumps(row), flush=True)
        if done.returncode != 0:  # the shapes after the last line it printed did not run
            failed = SHAPES[shapes[len(got)]][0] if len(got) < len(shapes) else None
            reason = next((line for line in reversed(done.stderr.splitlines()) if "Error" in line),
                          done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
            row = dict(config=index, config_text=str(CONFIGS[index]), layer=failed, failed=reason[:300])
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "attention_configs.json").write_text(json.dumps(dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, batch=args.batch, dtype=args.dtype, rows=rows),
        indent=1))
    print(f"\nbatch {args.batch}, {HEADS} heads, {args.dtype}, {torch.cuda.get_device_name()}\n")
    print("| config | layer | ms | useful TFLOP/s | error: max / relative |\n|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['config_text']} | {r['layer']} | - | - | failed: {r['failed']} |")
        else:
            print(f"| {r['config_text']} | {r['layer']} | {r['ms']:.3f} | {r['useful_tflops']:.0f} | "
                  f"{r['max_error']:.1e} / {r['rel_error']:.1e}{', %d NaN' % r['unwritten'] if r['unwritten'] else ''} |")


if __name__ == "__main__":
    main()
