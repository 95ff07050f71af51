"""The composite's feather on `diffedit eval` scenes, without editing again: recomposite a `--composite none` job.

    diffedit eval --seed 1 --n 32 --composite none --out WORK     # the tuning scenes, whole decodes kept
    python bench/feather_tune.py WORK --seed 1 --n 32 [--feathers 0 2 4 8 12]

For each feather, every ok row's decoded edit is composited onto its source with the row's own mask
(stages.composite, as the job does) and judged by `diffedit eval`'s judges (shapes/eval.py). Prints one JSON line
per feather: colour and shape success, psnr_bg4 (colour edits) and how often a colour edit's verdict differs from
the whole decode's.
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
from PIL import Image

from diffedit.manifests.store import OutputStore
from diffedit.shapes import eval as ev
from diffedit.stages.composite import composite
from diffedit.stages.model import load_model
from diffedit.stages.sources import SHIPPED_MODEL


def _rows(work: str, n: int, seed: int):
    edits = {(e.key, e.edit_index): e for e in ev.heldout_edits(ev.heldout_scenes(n, seed))}
    df = OutputStore(f"{work}/job").read().to_pandas()
    ok = df[df.status == "ok"]
    if (ok.composite != "none").any():
        raise SystemExit(f"{work} was not run with --composite none: its decodes are not whole.")
    for r in ok.itertuples():
        png = lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))  # noqa: E731
        yield edits[(r.key, int(r.edit_index))], png(r.edited_png), np.asarray(Image.open(io.BytesIO(r.mask_png))) > 0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--feathers", type=int, nargs="+", default=[0, 1, 2, 4, 6, 8, 12])
    args = parser.parse_args(argv)
    rows = list(_rows(args.work, args.n, args.seed))
    model = load_model(SHIPPED_MODEL, device="cpu", dtype="fp32")
    recon = ev.vae_ceilings(model, ev.heldout_scenes(args.n, args.seed))
    whole = [ev.judge_edit(e, decoded, mask, recon[e.key]) for e, decoded, mask in rows]
    print(json.dumps(dict(feather="none", **ev.summarize(whole)) | {"by_kind": None}))
    for f in args.feathers:
        judged = [ev.judge_edit(e, composite(e.scene.image, decoded, mask, f), mask, recon[e.key])
                  for e, decoded, mask in rows]
        s = ev.summarize(judged)
        flips = sum(a["color_success"] != b["color_success"] for a, b in zip(whole, judged) if a["kind"] == "color")
        print(json.dumps(dict(feather=f, color_success=s["color_success"], shape_success=s["shape_success"],
                              psnr_bg4=s["psnr_bg4"], color_verdicts_changed=flips)))


if __name__ == "__main__":
    main()
