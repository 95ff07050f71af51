"""Choose a model's recommended DiffEdit defaults on a *tuning* set: held-out scenes of seed 1, disjoint from
the scenes `diffedit eval` and bench/quality.py report on (seed 0), so the reported numbers are not tuned on.

    python bench/tune_defaults.py [N] > docs/quality/tuning.jsonl      # N one-object scenes (default 32)

Grid: guidance {3, 5, 7.5} x encoding ratio {0.8, 0.9} x threshold {0.5, 0.75}; colour and shape edits, judged
as `diffedit eval` judges them. Mask inference depends on none of the three except the threshold, so it runs
once and the thresholds re-binarise its soft maps (as bench/quality.py does). One JSON line per setting.
"""
import itertools
import json
import sys
import time

import torch

from quality import engine, judged  # bench/, beside this script

from diffedit.shapes import eval as ev
from diffedit.stages.config import EditConfig
from diffedit.stages.editor import SHIPPED_MODEL
from diffedit.stages.mask import upsample_map
from diffedit.stages.model import load_model
n = int(sys.argv[1]) if len(sys.argv) > 1 else 32
model = load_model(SHIPPED_MODEL, device="cpu", dtype="fp32")
base = EditConfig()  # the paper's defaults; the grid varies three of them
held = ev.heldout_scenes(n, seed=1)
edits = ev.heldout_edits(held)
recon = ev.vae_ceilings(model, held)
res = model.resolution
soft_cache = None
for thr in (0.5, 0.75):
    for g, r in itertools.product((3.0, 5.0, 7.5), (0.8, 0.9)):
        cfg = base.replace(guidance=g, encode_ratio=r, threshold=thr)
        t = time.time()
        if soft_cache is None:
            edited, masks, soft = engine(model, edits, cfg, 16)
            soft_cache = soft
        else:
            masks = [upsample_map(torch.from_numpy(s[None]) > thr, (res, res))[0].numpy() for s in soft_cache]
            edited, _, _ = engine(model, edits, cfg, 16, masks=masks)
        s, _ = judged(edits, edited, masks, recon)
        c, sh = s["by_kind"]["color"], s["by_kind"]["shape"]
        row = dict(guidance=g, encode_ratio=r, threshold=thr, color=c["color_success"], shape=sh["shape_success"],
                   iou=c["mask_iou"], bg4=c["psnr_bg4"],
                   bg4_gap=round(c["psnr_bg4_vae_ceiling"] - c["psnr_bg4"], 2), seconds=round(time.time() - t))
        print(json.dumps(row), flush=True)
