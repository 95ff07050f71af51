"""Sample-correctness check of a shapes model: draw held-out scenes' captions, judge colour and shape.

For each held-out one-object scene (seed 0), the model's pipeline draws the caption (50 steps, guidance 3;
DDIM for the UNet model, the flow model's own Euler sampler for the transformer); the judge takes the pixels
whose colour is nearest the caption's object colour (within a distance), checks that they are the largest
colour blob, and compares the blob's silhouette with the scene generator's masks of the four shapes by IoU.
Writes a PNG grid (rows: generated, reference).

    python -m diffedit.shapes.check_samples --model models/shapes-ldm --n 32 --out docs/shapes_samples.png
    python -m diffedit.shapes.check_samples --model models/shapes-flow --n 64
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image

from diffedit.shapes import scenes


def judge(image: np.ndarray, color: str, shape: str) -> tuple[bool, bool]:
    """(colour right, shape right) of a generated one-object image."""
    pix = image.astype(np.float32)
    dist = {c: np.linalg.norm(pix - np.array(rgb, np.float32), axis=-1) for c, rgb in scenes.COLORS.items()}
    nearest = np.argmin(np.stack(list(dist.values())), axis=0)
    within = np.min(np.stack(list(dist.values())), axis=0) < 60
    counts = {c: int(((nearest == i) & within).sum()) for i, c in enumerate(scenes.COLORS)}
    color_ok = counts[color] >= 30 and counts[color] == max(counts.values())
    if not color_ok:
        return False, False
    blob = (nearest == list(scenes.COLORS).index(color)) & within
    ys, xs = np.nonzero(blob)
    cx, cy = xs.mean(), ys.mean()
    r = np.sqrt(blob.sum() / np.pi)  # radius of the circle of the same area
    best, best_iou = None, -1.0
    for s in scenes.SHAPES:
        for angle in (-15, 0, 15):
            if s == "circle" and angle:
                continue
            # radius of a template of the same area
            tmpl = scenes._coverage(s, cx, cy, r, angle) >= 0.5
            k = np.sqrt(blob.sum() / max(tmpl.sum(), 1))
            tmpl = scenes._coverage(s, cx, cy, r * k, angle) >= 0.5
            iou = (tmpl & blob).sum() / max((tmpl | blob).sum(), 1)
            if iou > best_iou:
                best, best_iou = s, iou
    return True, best == shape


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/shapes-ldm")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default=None, help="PNG grid")
    args = p.parse_args(argv)
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline

    index = json.loads(open(f"{args.model}/model_index.json").read())
    absent = {k: None for k, v in index.items() if v == [None, None]}  # e.g. the flow model's T5, left out
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32, **absent)
    if isinstance(pipe, StableDiffusionPipeline):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    refs = []
    i = 0
    while len(refs) < args.n:  # held-out one-object scenes
        s = scenes.make_scene(0, i)
        if len(s.info["objects"]) == 1:
            refs.append(s)
        i += 1
    prompts = [s.caption for s in refs]
    g = torch.Generator().manual_seed(0)
    images = []
    for a in range(0, len(prompts), 16):
        out = pipe(prompts[a : a + 16], num_inference_steps=args.steps, guidance_scale=args.guidance, generator=g, output_type="np")
        images.extend((out.images * 255).round().astype(np.uint8))
    verdicts = [judge(img, s.info["objects"][0]["color"], s.info["objects"][0]["shape"]) for img, s in zip(images, refs)]
    result = {
        "n": len(refs),
        "color_right": sum(c for c, _ in verdicts),
        "shape_right": sum(sh for _, sh in verdicts),
        "both_right": sum(c and sh for c, sh in verdicts),
        "guidance": args.guidance,
        "steps": args.steps,
    }
    print(json.dumps(result))
    for s, (c, sh) in zip(refs, verdicts):
        print(f"{'ok ' if c and sh else 'BAD'} color={c} shape={sh}  {s.caption}")
    if args.out:
        cols = 8
        rows = []
        for a in range(0, len(images), cols):
            rows.append(np.concatenate(images[a : a + cols], 1))
            rows.append(np.concatenate([s.image for s in refs[a : a + cols]], 1))
        Image.fromarray(np.concatenate(rows, 0)).resize((cols * 128, len(rows) * 128), Image.NEAREST).save(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
