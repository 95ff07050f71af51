"""The quality gate of the speed flags: every flag (and --preset fast) against the default engine, same model, same
held-out scenes, same device.

    python bench/fast_gate.py [--n 64] [--model models/shapes-ldm] [--device auto] [--variants NAME,...] [--out DIR]

Per variant:
1. ``diffedit eval`` through the real job (``shapes.eval.run_eval``): mask IoU, colour and shape success,
   ``psnr_bg4`` over the colour and shape edits of ``n`` held-out scenes; with ``--in-process``, the same edits
   and judges through ``stages.editor.edit_batch`` (no Ray: a GPU machine without it).
2. In-process (``stages.editor.edit_batch``), the identity edits (target = source) with no mask (an all-ones mask,
   every pixel decoded): how well encoding then decoding gives the image back, which fewer steps or reused
   features could lose; and the identity edits with the inferred mask (its area).

The gate (docs/BENCHMARKS.md): no worse than the default by more than 0.02 mask IoU, 2 points of colour or shape
success, 0.5 dB of ``psnr_bg4`` or of the identity edit's PSNR. Writes ``OUT/fast_gate_<device>.json`` and prints
a markdown table. ``fp8`` needs a CUDA GPU of compute capability 8.9 or more, and torchao.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import add_out_argument, result_path, write_result
from quality import engine, judged

from diffedit.pipelines.config import resolve_preset
from diffedit.shapes import eval as ev
from diffedit.stages.config import EditConfig
from diffedit.stages.editor import SHIPPED_MODEL
from diffedit.stages.model import load_model

# name -> (edit parameters, other job options)
VARIANTS = {
    "default": ({}, {}),
    "steps 25": ({"steps": 25}, {}),
    "steps 15": ({"steps": 15}, {}),
    "dpm 50": ({"solver": "dpm"}, {}),
    "dpm 25": ({"solver": "dpm", "steps": 25}, {}),
    "dpm 15": ({"solver": "dpm", "steps": 15}, {}),
    "reuse 2": ({"cache_interval": 2}, {}),
    "reuse 3": ({"cache_interval": 3}, {}),
    "reuse 5": ({"cache_interval": 5}, {}),
    "reuse 3 + encoding": ({"cache_interval": 3, "encode_cache_interval": 3}, {}),
    "dpm 25 + reuse 2": ({"solver": "dpm", "steps": 25, "cache_interval": 2}, {}),
    "steps 25 + reuse 2": ({"steps": 25, "cache_interval": 2}, {}),
    "fp8": ({}, {"fp8": True}),
    "preset fast": ({}, {"preset": "fast"}),
}
# (summary key, tolerance, scale for the table)
GATE = (("mask_iou", 0.02), ("color_success", 0.02), ("shape_success", 0.02), ("psnr_bg4", 0.5),
        ("identity_psnr", 0.5))


def identity_psnr(model, held, config: EditConfig, batch_size: int) -> dict:
    """Identity edits: with no mask (every pixel decoded; PSNR of the whole image) and with the inferred mask."""
    identity = ev.identity_edits(held)
    recon = ev.vae_ceilings(model, held)
    res = model.resolution
    ones = [np.ones((res, res), bool)] * len(identity)
    none = config.replace(composite="none")
    edited, _, _ = engine(model, identity, none, batch_size, masks=ones)
    no_mask = judged(identity, edited, ones, recon)[0]["by_kind"]["identity"]
    edited, masks, _ = engine(model, identity, config, batch_size)
    inferred = judged(identity, edited, masks, recon)[0]["by_kind"]["identity"]
    return dict(identity_psnr=no_mask["psnr_image"], identity_mask_fraction=inferred["mask_fraction"],
                identity_psnr_bg4=inferred["psnr_bg4"])


def measure(name: str, args) -> dict:
    edit, job = VARIANTS[name]
    t0 = time.time()
    model = load_model(args.model or SHIPPED_MODEL, device=args.device)
    if job.get("fp8"):
        model.to_fp8()
    preset_edit = resolve_preset(job.get("preset"), model.family.name)
    config = EditConfig.from_flat(model.recommended).replace(**{**preset_edit, **edit})
    held = ev.heldout_scenes(args.n)
    if args.in_process:  # the job's edits and judges, without Ray: stages.editor.edit_batch on the same edits
        edits = ev.heldout_edits(held)
        edited, masks, _ = engine(model, edits, config, args.batch_size)
        summary = dict(judged(edits, edited, masks, ev.vae_ceilings(model, held))[0], errors=0)
    else:
        summary, _ = ev.run_eval(args.n, model=args.model, out=tempfile.mkdtemp(prefix="gate-"), edit=edit, job=job,
                                 device=args.device, batch_size=args.batch_size, log=lambda *a: None)
    row = dict(summary={k: summary[k] for k in ("mask_iou", "color_success", "shape_success", "psnr_bg4",
                                                 "psnr_bg4_vae_ceiling", "n", "n_edits", "errors")},
               params=config.flat(), job=job, path="in-process" if args.in_process else "diffedit eval (the job)")
    row["summary"].update(identity_psnr(model, held, config, args.batch_size))
    row["seconds"] = round(time.time() - t0, 1)
    return row


def verdict(row: dict, base: dict) -> tuple[bool, list[str]]:
    """Pass unless a metric is worse than the default's by more than its tolerance; the failing metrics."""
    failed = [k for k, tol in GATE if row["summary"][k] is not None and base["summary"][k] is not None
              and row["summary"][k] < base["summary"][k] - tol - 1e-9]
    return not failed, failed


def table(rows: dict) -> str:
    base = rows["default"]
    out = ["| variant | mask IoU | colour | shape | psnr_bg4 | identity PSNR | gate |", "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        s = row["summary"]
        ok, failed = verdict(row, base)
        out.append(f"| {name} | {s['mask_iou']:.3f} | {s['color_success']:.1%} | {s['shape_success']:.1%} | "
                   f"{s['psnr_bg4']:.2f} | {s['identity_psnr']:.2f} | "
                   + ("pass" if ok else "fail: " + ", ".join(failed)) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="held-out scenes (default 64; two edits each)")
    p.add_argument("--model", default=None, help="diffusers model folder (default: the shipped shapes model)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--in-process", action="store_true", help="edit with stages.editor.edit_batch instead of the job "
                                                             "(no Ray; the same edits and judges)")
    p.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "fp8"),
                   help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all but fp8); 'default' always runs")
    add_out_argument(p)
    args = p.parse_args(argv)
    names = ["default"] + [v.strip() for v in args.variants.split(",") if v.strip() and v.strip() != "default"]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    path = result_path("fast_gate", Path(args.out), args.device if args.device != "auto" else None)
    rows = {}
    for name in names:
        rows[name] = measure(name, args)
        ok, failed = verdict(rows[name], rows["default"])
        print(f"{name}: {rows[name]['summary']} -> {'pass' if ok else 'fail ' + str(failed)} "
              f"({rows[name]['seconds']:.0f} s)", file=sys.stderr, flush=True)
        for r in rows.values():
            r["gate"] = dict(zip(("pass", "failed"), verdict(r, rows["default"])))
        write_result(path, None, n=args.n, model=str(args.model or SHIPPED_MODEL), tolerances=dict(GATE), variants=rows)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
