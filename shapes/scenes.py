"""The shapes world: small scenes with known ground truth, deterministic by (seed, index).

A scene is a 64 x 64 RGB image: a background (a muted plain colour, or stripes, a checker or a smooth
mottle of it) and one to three objects (circle, square, triangle, star in one of seven saturated
colours) drawn in order, later objects occluding earlier ones. Each scene comes with a caption naming
the objects and the background, one ground-truth mask per object (its *visible* pixels), and the object
list as json. ``write_shards`` stores scenes as WebDataset shards with ``webdataset.TarWriter``:
``KEY.png``, ``KEY.txt``, ``KEY.json``, ``KEY.mask_0.png``, ``KEY.mask_1.png``, ...

Seeds: training draws scenes with seeds >= TRAIN_SEED_MIN (1_000_000); held-out evaluation scenes use
seeds below it, so no evaluation scene is ever seen in training.

    python -m diffedit.shapes.scenes generate --out DIR --shards N --per-shard M --seed S
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down: anti-aliased edges, masks at coverage >= 0.5
TRAIN_SEED_MIN = 1_000_000  # training seeds are >= this; evaluation seeds are below it
EVAL_SEED = 0  # the default held-out scene seed of `diffedit eval` (< TRAIN_SEED_MIN)

# Object colours: saturated, far from each other and from the muted backgrounds.
COLORS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 220),
    "yellow": (245, 215, 35),
    "purple": (145, 55, 195),
    "orange": (245, 130, 25),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star")
# Background colours: muted, so every object colour stands out on each of them.
BACKGROUNDS = {
    "gray": (125, 125, 125),
    "black": (35, 35, 40),
    "brown": (105, 78, 58),
    "beige": (190, 178, 150),
}
TEXTURES = ("plain", "striped", "checkered", "mottled")

# Every word a caption can use: the tokenizer makes each of them a single token.
WORDS = ("a", "an", "and", "on", "background", *COLORS, *SHAPES, *BACKGROUNDS, *TEXTURES)

MAX_OBJECTS = 3
MIN_VISIBLE = 0.6  # an object keeps at least this fraction of its own area visible


@dataclass
class Scene:
    image: np.ndarray  # H x W x 3 uint8
    caption: str
    masks: list[np.ndarray]  # one H x W bool array per object: its visible pixels
    info: dict = field(default_factory=dict)  # background, objects (shape, color, bbox, area, mask), seed, index


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of scene ``index`` under ``seed``: independent of every other scene's."""
    return np.random.default_rng([int(seed), int(index)])


def _background(rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    base = np.array(BACKGROUNDS[name], dtype=np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    contrast = 22.0
    if texture == "plain":
        shade = np.zeros((SIZE, SIZE), np.float32)
    elif texture == "striped":
        period = int(rng.integers(8, 17))
        angle = float(rng.choice([0.0, 45.0, 90.0, 135.0]))
        u = xx * np.cos(np.radians(angle)) + yy * np.sin(np.radians(angle))
        shade = np.where(((u + rng.integers(period)) // (period / 2)) % 2 == 0, contrast, -contrast)
    elif texture == "checkered":
        cell = int(rng.integers(6, 13))
        ox, oy = rng.integers(cell, size=2)
        shade = np.where((((xx + ox) // cell) + ((yy + oy) // cell)) % 2 == 0, contrast, -contrast)
    else:  # mottled: low-frequency noise, 5x5 random values upsampled smoothly
        coarse = Image.fromarray(rng.uniform(-1.0, 1.0, (5, 5)).astype(np.float32), mode="F")
        shade = np.asarray(coarse.resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32) * contrast * 1.5
    image = np.clip(base[None, None, :] + shade[..., None], 0, 255)
    return image, {"color": name, "texture": texture, "rgb": [int(c) for c in BACKGROUNDS[name]]}


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        k, rr = 4, [r] * 4
    elif shape == "triangle":
        k, rr = 3, [r * 1.15] * 3
    else:  # star: five points, inner radius 0.45 r
        k, rr = 10, [r * 1.15 if i % 2 == 0 else r * 0.5 for i in range(10)]
    offset = {"square": 45.0, "triangle": -90.0, "star": -90.0}[shape]
    points = []
    for i in range(k):
        a = np.radians(offset + angle + 360.0 * i / k)
        points.append((cx + rr[i] * np.cos(a), cy + rr[i] * np.sin(a)))
    return points


def _coverage(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Fraction of each pixel covered by the shape (H x W float in [0, 1]), from a 4x supersampled drawing."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (SIZE * s, SIZE * s), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
    else:
        draw.polygon([(x * s, y * s) for x, y in _polygon(shape, cx, cy, r, angle)], fill=255)
    big = np.asarray(canvas, dtype=np.float32) / 255.0
    return big.reshape(SIZE, s, SIZE, s).mean(axis=(1, 3))


def make_scene(seed: int, index: int) -> Scene:
    """Scene ``index`` of ``seed``: the same pixels, caption, masks and json on every machine."""
    rng = scene_rng(seed, index)
    image, background = _background(rng)
    n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    kinds = rng.permutation([(c, s) for c in COLORS for s in SHAPES])[:n_objects]  # no (colour, shape) twice
    alphas: list[np.ndarray] = []
    objects: list[dict] = []
    for color, shape in kinds:
        for _ in range(100):  # rejection sampling of the placement: limited overlap, every object stays visible
            r = float(rng.uniform(7.0, 14.0))
            margin = r * 1.15 + 1
            cx, cy = rng.uniform(margin, SIZE - margin, size=2)
            angle = float(rng.uniform(-20, 20)) if shape != "circle" else 0.0
            alpha = _coverage(shape, float(cx), float(cy), r, angle)
            mask = alpha >= 0.5
            ok = True
            for i, prev in enumerate(alphas):  # every earlier object keeps MIN_VISIBLE of its area
                full = prev >= 0.5
                covered = mask.copy()
                for later in alphas[i + 1 :]:
                    covered |= later >= 0.5
                if (full & ~covered).sum() < MIN_VISIBLE * full.sum():
                    ok = False
                    break
            if ok:
                break
        else:
            continue  # no room: the scene has fewer objects
        jitter = rng.integers(-12, 13, size=3)
        rgb = np.clip(np.array(COLORS[color]) + jitter, 0, 255)
        image = image * (1 - alpha[..., None]) + rgb[None, None, :] * alpha[..., None]
        alphas.append(alpha)
        objects.append({"shape": str(shape), "color": str(color), "rgb": [int(c) for c in rgb]})
    # Occlusion: an object's ground truth is what later objects leave of it.
    masks = []
    for i, alpha in enumerate(alphas):
        visible = alpha >= 0.5
        for later in alphas[i + 1 :]:
            visible &= ~(later >= 0.5)
        masks.append(visible)
    keep = [i for i, m in enumerate(masks) if m.sum() >= MIN_VISIBLE * (alphas[i] >= 0.5).sum()]
    assert len(keep) == len(masks), "placement guarantees visibility"
    for i, (obj, m) in enumerate(zip(objects, masks)):
        ys, xs = np.nonzero(m)
        obj["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]  # x0, y0, x1, y1
        obj["area"] = int(m.sum())
        obj["mask"] = f"mask_{i}.png"
    caption = make_caption(objects, background)
    info = {"seed": int(seed), "index": int(index), "size": SIZE, "background": background, "objects": objects}
    return Scene(np.round(image).astype(np.uint8), caption, masks, info)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(objects: list[dict], background: dict) -> str:
    """'a red circle and a blue square on a striped gray background' (objects in drawing order)."""
    names = [f"{_article(o['color'])} {o['color']} {o['shape']}" for o in objects]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    texture = "" if background["texture"] == "plain" else background["texture"] + " "
    bg = f"{texture}{background['color']} background"
    return f"{listed} on {_article(bg)} {bg}"


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def scene_sample(scene: Scene) -> dict:
    """The WebDataset members of one scene (``__key__`` is ``SEED_INDEX``, zero-padded)."""
    sample = {
        "__key__": f"{scene.info['seed']:07d}_{scene.info['index']:08d}",
        "png": png_bytes(scene.image),
        "txt": scene.caption.encode("utf-8"),
        "json": json.dumps(scene.info).encode("utf-8"),
    }
    for i, mask in enumerate(scene.masks):
        sample[f"mask_{i}.png"] = png_bytes(mask.astype(np.uint8) * 255)
    return sample


def write_shards(out_dir: str | Path, shards: int, per_shard: int, seed: int = 0) -> list[Path]:
    """Write ``shards`` tars of ``per_shard`` scenes each; shard k holds indices k*per_shard ... (k+1)*per_shard-1."""
    import webdataset as wds

    if shards < 1 or per_shard < 1:
        raise ValueError(f"`shards` and `per_shard` must be >= 1 but are {shards} and {per_shard}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(shards):
        path = out / f"shapes-{seed:07d}-{k:05d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for index in range(k * per_shard, (k + 1) * per_shard):
                sink.write(scene_sample(make_scene(seed, index)))
        tmp.replace(path)  # a shard exists only once complete
        paths.append(path)
    return paths


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``generate`` (the shapes world as WebDataset shards) on an argparse subparser group."""
    p = subparsers.add_parser(
        "generate",
        help="write shapes-world scenes as WebDataset shards",
        description="Write scenes of the shapes world (image png, caption txt, objects json, one mask png per object) "
        f"as WebDataset shards, deterministic by seed. Training uses seeds >= {TRAIN_SEED_MIN:,}; use seeds below "
        "that for held-out evaluation.",
    )
    p.add_argument("--out", required=True, help="output folder for the .tar shards")
    p.add_argument("--shards", type=int, default=1, help="number of shards (default 1)")
    p.add_argument("--per-shard", type=int, default=100, help="scenes per shard (default 100)")
    p.add_argument("--seed", type=int, default=0, help="scene seed (default 0, a held-out seed)")
    p.set_defaults(func=_run_generate)
    return p


def _run_generate(args) -> int:
    paths = write_shards(args.out, args.shards, args.per_shard, args.seed)
    print(f"wrote {len(paths)} shard(s) of {args.per_shard} scenes to {args.out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffedit shapes", description="The shapes world.")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
