"""Choose a model's recommended DiffEdit defaults on a *tuning* set: held-out scenes of seed 1, disjoint from
the scenes `diffedit eval` and bench/quality.py report on (seed 0), so the reported numbers are not tuned on.

    python bench/tune_defaults.py [N] [--model DIR] > docs/quality/tuning.jsonl   # N one-object scenes (default 32)
    python bench/tune_defaults.py --with steps=25 --with conditional_encoding=true   # options held fixed

Grid: guidance {3, 5, 7.5} x encoding ratio {0.8, 0.9} x threshold {0.5, 0.75}; colour and shape edits, judged
as `diffedit eval` judges them. Mask inference depends on none of the three except the threshold, so it runs
once and the thresholds re-binarise its soft maps (as bench/quality.py does). One JSON line per setting.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from harness import timed
from quality import engine, judged  # bench/, beside this script

from diffedit.shapes import eval as ev
from diffedit.stages.config import EditConfig
from diffedit.stages.editor import SHIPPED_MODEL
from diffedit.stages.mask import upsample_map
from diffedit.stages.model import load_model

GUIDANCE = (3.0, 5.0, 7.5)
ENCODE_RATIO = (0.8, 0.9)
THRESHOLD = (0.5, 0.75)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("n", type=int, nargs="?", default=32, help="held-out one-object scenes of the tuning set (default 32)")
    p.add_argument("--model", default=str(SHIPPED_MODEL), help="the model folder (default: the shipped shapes model)")
    p.add_argument("--threshold", type=float, nargs="+", default=THRESHOLD, help=f"thresholds (default {THRESHOLD})")
    p.add_argument("--guidance", type=float, nargs="+", default=GUIDANCE, help=f"guidance scales (default {GUIDANCE})")
    p.add_argument("--encode-ratio", type=float, nargs="+", default=ENCODE_RATIO, help=f"default {ENCODE_RATIO}")
    p.add_argument("--with", dest="fixed", action="append", default=[], metavar="OPTION=VALUE",
                   help="an edit option held fixed over the grid, as in diffedit.json (a JSON value: steps=25, "
                        "conditional_encoding=true); repeatable")
    args = p.parse_args(argv)
    model = load_model(args.model, device="cpu", dtype="fp32")
    fixed = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.fixed)}
    base = EditConfig().replace(**fixed)  # the paper's defaults and --with; the grid varies three of them
    held = ev.heldout_scenes(args.n, seed=1)
    edits = ev.heldout_edits(held)
    recon = ev.vae_ceilings(model, held)
    res = model.resolution
    soft_cache = None
    for thr in args.threshold:
        for g, r in itertools.product(args.guidance, args.encode_ratio):
            cfg = base.replace(guidance=g, encode_ratio=r, threshold=thr)

            def edit_and_judge():
                if soft_cache is None:  # the first setting infers the masks; the others re-binarise its soft maps
                    edited, masks, soft = engine(model, edits, cfg, 16)
                else:
                    masks = [upsample_map(torch.from_numpy(s[None]) > thr, (res, res))[0].numpy() for s in soft_cache]
                    edited, _, _ = engine(model, edits, cfg, 16, masks=masks)
                    soft = soft_cache
                return judged(edits, edited, masks, recon)[0], soft

            run = timed(edit_and_judge, warmup=0)
            s, soft_cache = run.result
            c, sh = s["by_kind"]["color"], s["by_kind"]["shape"]
            row = dict(**fixed, guidance=g, encode_ratio=r, threshold=thr, color=c["color_success"], shape=sh["shape_success"],
                       iou=c["mask_iou"], bg4=c["psnr_bg4"],
                       bg4_gap=round(c["psnr_bg4_vae_ceiling"] - c["psnr_bg4"], 2), seconds=round(run.steady_s))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
