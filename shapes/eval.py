"""Edit quality on the shapes benchmark: held-out scenes, ground-truth judges, and `diffedit eval`.

The held-out set is the first ``n`` one-object scenes of a seed below ``scenes.TRAIN_SEED_MIN`` (training
never sees them), in index order, so the same ``n`` and seed always give the same scenes. Each scene gets
two edits from ``EVAL_RULES``: a colour swap (red -> blue, ...) and a shape swap (circle -> square, ...).
`diffedit eval` runs the real job on them and judges every row of the manifest against the scene's ground
truth:

- ``mask_iou``: IoU of the engine's mask (``mask_png``, at image resolution) with the edited object's
  ground-truth mask; colour edits, where that mask is the whole right answer.
- ``color_success``: the median colour of the edit inside the ground-truth object region is, of all the
  world's object and background colours, nearest the target colour.
- ``shape_success``: the silhouette judge of ``shapes.check_samples`` (largest blob of the object's colour,
  IoU with the four shape templates) names the target shape. ``shape_success_clip``, the shipped CLIP's
  verdict read from the manifest (``clip_target > clip_source``), is reported beside it (``clip_success``
  per kind).
- ``psnr_bg`` / ``psnr_bg4``: PSNR (8-bit, data range 255) of input vs edit outside the object, and outside
  the object dilated by one latent cell (4 px); colour edits, where the object region is known exactly.
- ``psnr_vae_ceiling`` / ``psnr_bg4_vae_ceiling``: the same regions for a plain VAE encode-decode (posterior
  mean) of the input: what an edit in latent space cannot beat.
- ``mask_iou_ceiling``: the ground-truth mask taken to the latent grid (a cell is in when >= half of its
  pixels are) and back: what a perfect latent-resolution mask reaches.

    diffedit eval [--n 64] [--model M] [--seed S] [--out DIR] [--guidance G --encode-ratio R ...]
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..manifests.schema import missing
from ..manifests.store import OutputStore
from . import scenes
from .check_samples import judge as silhouette_judge

EVAL_SEED = scenes.EVAL_SEED
LATENT_CELL = 4  # pixels per latent cell of the shipped VAE (64 -> 16): the dilation of psnr_bg4
PSNR_MAX = 100.0  # dB, for identical regions (JSON has no infinity)
# One colour and one shape swap per one-object caption. Swaps keep the article right ("an orange" is
# replaced whole), since every training caption has it right.
COLOR_SWAPS = {"red": "blue", "blue": "red", "green": "yellow", "yellow": "green", "purple": "white",
               "white": "purple", "an orange": "a red"}
SHAPE_SWAPS = {"circle": "square", "square": "circle", "triangle": "star", "star": "triangle"}
EVAL_RULES = {"rules": [{"from": a, "to": [b]} for a, b in {**COLOR_SWAPS, **SHAPE_SWAPS}.items()]}
JUDGES = {
    "color": "median RGB inside the ground-truth object mask, nearest of the world's object and background "
             "colours, must be the target colour",
    "shape": "silhouette IoU (shapes.check_samples.judge): the largest blob of the object's colour must match the "
             "target shape's template best",
    "clip": "the shipped CLIP (manifest columns): clip_target > clip_source (clip_success per kind; "
            "shape_success_clip for shape edits)",
}


@dataclass(frozen=True)
class EvalEdit:
    """One (scene, edit) of the benchmark, with the ground truth the judges need."""

    key: str
    edit_index: int
    source_prompt: str
    target_prompt: str
    kind: str  # "color" | "shape" | "identity"
    target: str  # the target colour or shape
    scene: scenes.Scene

    @property
    def obj(self) -> dict:
        return self.scene.info["objects"][0]


def scene_key(scene: scenes.Scene) -> str:
    """The scene's WebDataset key, as ``scenes.scene_sample`` writes it."""
    return f"{scene.info['seed']:07d}_{scene.info['index']:08d}"


def heldout_scenes(n: int, seed: int = EVAL_SEED) -> list[scenes.Scene]:
    """The first ``n`` one-object scenes of ``seed`` (a held-out seed), in index order."""
    if not 0 <= seed < scenes.TRAIN_SEED_MIN:
        raise ValueError(f"`seed` must be in [0, {scenes.TRAIN_SEED_MIN:,}) (held out from training) but is {seed}.")
    if n < 1:
        raise ValueError(f"`n` must be >= 1 but is {n}.")
    out, index = [], 0
    while len(out) < n:
        scene = scenes.make_scene(seed, index)
        if len(scene.info["objects"]) == 1:
            out.append(scene)
        index += 1
    return out


def heldout_edits(held: list[scenes.Scene]) -> list[EvalEdit]:
    """The edits the job derives from ``EVAL_RULES`` (same prompts, same edit indices), with their kinds."""
    from ..pipelines.prompts import PromptSpec

    spec = PromptSpec.from_dict(EVAL_RULES)
    out = []
    for scene in held:
        key = scene_key(scene)
        for i, e in enumerate(spec.edits(key, scene.caption, None)):
            new = set(e.target_prompt.split()) - set(e.source_prompt.split())
            kind = "color" if new & set(scenes.COLORS) else "shape"
            target = next(w for w in new if w in scenes.COLORS or w in scenes.SHAPES)
            out.append(EvalEdit(key, i, e.source_prompt, e.target_prompt, kind, target, scene))
    return out


def identity_edits(held: list[scenes.Scene]) -> list[EvalEdit]:
    """Target = source: the edit should change nothing (judged as a colour edit to the object's own colour)."""
    return [EvalEdit(scene_key(s), 0, s.caption, s.caption, "identity", s.info["objects"][0]["color"], s) for s in held]


def write_heldout_shard(held: list[scenes.Scene], path: str | Path) -> Path:
    """The scenes as one WebDataset shard (the members of ``scenes.write_shards``)."""
    import webdataset as wds

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tar.tmp")
    with wds.TarWriter(str(tmp)) as sink:
        for scene in held:
            sink.write(scenes.scene_sample(scene))
    tmp.replace(path)
    return path


# -- the judges ------------------------------------------------------------------------------------------

_PALETTE = {**scenes.COLORS, **{f"background {k}": v for k, v in scenes.BACKGROUNDS.items()}}


def nearest_color(rgb) -> str:
    """The name of the world's colour (object colours, and backgrounds as 'background NAME') nearest ``rgb``."""
    names = list(_PALETTE)
    dist = np.linalg.norm(np.array([_PALETTE[k] for k in names], np.float32) - np.asarray(rgb, np.float32), axis=1)
    return names[int(np.argmin(dist))]


def region_color(image_HW3: np.ndarray, region_HW: np.ndarray) -> str:
    """The colour name of the median pixel of ``region_HW``."""
    return nearest_color(np.median(image_HW3[region_HW].reshape(-1, 3), axis=0))


def shape_ok(image_HW3: np.ndarray, color: str, shape: str) -> bool:
    return silhouette_judge(image_HW3, color, shape)[1]


def iou(a_HW: np.ndarray, b_HW: np.ndarray) -> float:
    union = np.logical_or(a_HW, b_HW).sum()
    return float(np.logical_and(a_HW, b_HW).sum() / union) if union else 1.0


def psnr(a_HW3: np.ndarray, b_HW3: np.ndarray, region_HW: np.ndarray) -> float:
    """The scorer's PSNR of two 8-bit images over the pixels of ``region_HW`` (data range 255), at most PSNR_MAX
    (also for an identical or empty region, where it is +inf or NaN)."""
    import torch

    from ..stages.scores import region_psnr

    a, b = (torch.tensor(x).permute(2, 0, 1)[None] for x in (a_HW3, b_HW3))  # copies: PIL's arrays are read-only
    value = float(region_psnr(a, b, torch.tensor(region_HW)[None], data_range=255))
    return value if value < PSNR_MAX else PSNR_MAX  # NaN < PSNR_MAX is false


def dilate(mask_HW: np.ndarray, px: int = LATENT_CELL) -> np.ndarray:
    """Binary dilation by ``px`` pixels in every direction (a (2 px + 1)^2 square)."""
    padded = np.pad(mask_HW, px)
    out = np.zeros_like(mask_HW)
    H, W = mask_HW.shape
    for dy in range(2 * px + 1):
        for dx in range(2 * px + 1):
            out |= padded[dy : dy + H, dx : dx + W]
    return out


def latent_mask_ceiling(mask_HW: np.ndarray, cell: int = LATENT_CELL) -> np.ndarray:
    """The ground-truth mask at latent resolution (cells at least half covered) and back to pixels."""
    H, W = mask_HW.shape
    cells = mask_HW.reshape(H // cell, cell, W // cell, cell).mean(axis=(1, 3)) >= 0.5
    return np.kron(cells, np.ones((cell, cell), bool)).astype(bool)


def vae_reconstructions(model, images: list[np.ndarray], batch_size: int = 32) -> list[np.ndarray]:
    """8-bit VAE encode-decode (posterior mean) of each image at the model's resolution."""
    import torch

    from ..stages.images import images_to_tensor, tensor_to_images

    out = []
    with torch.no_grad():
        for a in range(0, len(images), batch_size):
            chunk = [Image.fromarray(im) for im in images[a : a + batch_size]]
            x = images_to_tensor(chunk, model.resolution).to(model.device, model.dtype)
            decoded = model.decode_latents(model.encode_images(x))
            out += [np.asarray(im) for im in tensor_to_images(decoded, [im.size for im in chunk])]
    return out


def vae_ceilings(model, held: list[scenes.Scene]) -> dict[str, np.ndarray]:
    """Each held-out scene's VAE encode-decode (the ceilings' image), by scene key."""
    return dict(zip((scene_key(s) for s in held), vae_reconstructions(model, [s.image for s in held])))


def judge_edit(edit: EvalEdit, edited_HW3: np.ndarray, mask_HW: np.ndarray, recon_HW3: np.ndarray) -> dict:
    """Every metric of one edit against its scene's ground truth (``recon_HW3``: the VAE ceiling's image)."""
    source, obj_mask = edit.scene.image, edit.scene.masks[0]
    outside, outside4 = ~obj_mask, ~dilate(obj_mask)
    row = dict(
        key=edit.key, edit_index=edit.edit_index, kind=edit.kind, target=edit.target,
        mask_iou=iou(mask_HW, obj_mask), mask_iou_ceiling=iou(latent_mask_ceiling(obj_mask), obj_mask),
        mask_fraction=float(mask_HW.mean()),
        psnr_bg=psnr(source, edited_HW3, outside), psnr_bg4=psnr(source, edited_HW3, outside4),
        psnr_vae_ceiling=psnr(source, recon_HW3, outside), psnr_bg4_vae_ceiling=psnr(source, recon_HW3, outside4),
        psnr_image=psnr(source, edited_HW3, np.ones_like(obj_mask)),
        color_seen=region_color(edited_HW3, obj_mask),
    )
    row["color_success"] = row["color_seen"] == (edit.target if edit.kind != "shape" else edit.obj["color"])
    # The silhouette of the object's blob: the target shape in the object's colour for a shape edit; the
    # object's own shape, kept, in the colour it now has for a colour (or identity) edit.
    color = edit.obj["color"] if edit.kind == "shape" else row["color_seen"]
    shape = edit.target if edit.kind == "shape" else edit.obj["shape"]
    row["shape_success"] = color in scenes.COLORS and shape_ok(edited_HW3, color, shape)
    return row


def _mean(values) -> float | None:
    values = [float(v) for v in values if not missing(v)]
    return round(float(np.mean(values)), 4) if values else None


METRICS = ("mask_iou", "color_success", "shape_success", "psnr_bg", "psnr_bg4", "psnr_vae_ceiling",
           "psnr_bg4_vae_ceiling", "mask_iou_ceiling", "mask_fraction", "psnr_image")


def summarize(rows: list[dict]) -> dict:
    """The benchmark's JSON: headline numbers (mask and PSNRs over colour edits, success per kind), by kind."""
    by_kind = {}
    for kind in sorted({r["kind"] for r in rows}):
        sub = [r for r in rows if r["kind"] == kind]
        by_kind[kind] = {"n_edits": len(sub), **{m: _mean(r.get(m) for r in sub) for m in METRICS + ("clip_success",)}}
    color = by_kind.get("color") or by_kind.get("identity") or {}
    shape = by_kind.get("shape", {})
    return dict(
        mask_iou=color.get("mask_iou"), color_success=color.get("color_success"),
        shape_success=shape.get("shape_success"), shape_success_clip=shape.get("clip_success"),
        psnr_bg=color.get("psnr_bg"), psnr_bg4=color.get("psnr_bg4"),
        psnr_vae_ceiling=color.get("psnr_vae_ceiling"), psnr_bg4_vae_ceiling=color.get("psnr_bg4_vae_ceiling"),
        mask_iou_ceiling=color.get("mask_iou_ceiling"), n=len({r["key"] for r in rows}), n_edits=len(rows),
        by_kind=by_kind,
    )


# -- the benchmark through the real job ------------------------------------------------------------------

MANIFEST_COLUMNS = ["key", "edit_index", "status", "edited_png", "mask_png", "clip_source", "clip_target"]  # judged


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _mask(data: bytes, size: int) -> np.ndarray:
    m = Image.open(io.BytesIO(data)).convert("L")
    return np.asarray(m.resize((size, size), Image.Resampling.NEAREST) if m.size != (size, size) else m) > 127


def run_eval(n: int = 64, seed: int = EVAL_SEED, model: str | None = None, out: str | None = None,
             edit: dict | None = None, edit_seed: int = 0, batch_size: int = 8, device: str = "auto",
             overwrite: bool = False, log=print, job: dict | None = None) -> tuple[dict, list[dict]]:
    """Write the held-out shard, run the real job on it, judge every row; returns (summary, per-edit rows).
    ``edit``: edit parameters (flat keys); ``job``: other options of the job (``fp8=True``, ``compile=True``)."""
    import ray

    from ..pipelines.config import JobConfig
    from ..pipelines.job import run_job
    from ..stages.editor import SHIPPED_MODEL
    from ..stages.model import load_model

    t0 = time.time()
    work = Path(out) if out else Path(tempfile.mkdtemp(prefix="diffedit-eval-"))
    held = heldout_scenes(n, seed)
    edits = {(e.key, e.edit_index): e for e in heldout_edits(held)}
    shard = write_heldout_shard(held, work / "shards" / f"heldout-{seed:07d}-{n:05d}.tar")
    rules = work / "rules.json"
    rules.write_text(json.dumps(EVAL_RULES, indent=1))
    was_running = ray.is_initialized()
    run_job(JobConfig.from_flat([str(shard)], work / "job", model=model, prompts=str(rules), **dict(edit or {}),
                                **dict(job or {}), seed=edit_seed, batch_size=batch_size, device=device,
                                overwrite=overwrite), log=log)
    if not was_running:
        ray.shutdown()

    # Read the manifest back through the store (the one reader of the output layout), as pandas.
    store = OutputStore(work / "job")
    df = store.read(columns=MANIFEST_COLUMNS).to_pandas()
    run = store.read_run()
    ok = df[df["status"] == "ok"]
    loaded = load_model(model or SHIPPED_MODEL, device="cpu", dtype="fp32")
    recon = vae_ceilings(loaded, held)
    rows = []
    for r in ok.itertuples():
        e = edits[(r.key, int(r.edit_index))]
        row = judge_edit(e, _png(r.edited_png), _mask(r.mask_png, scenes.SIZE), recon[r.key])
        if not (missing(r.clip_target) or missing(r.clip_source)):
            row["clip_success"] = bool(r.clip_target > r.clip_source)
        rows.append(row)
    summary = summarize(rows)
    summary.update(
        errors=int((df["status"] != "ok").sum()), scene_seed=seed, edit_seed=edit_seed, params=run["edit"],
        model=run["model"], model_fingerprint=run["model_fingerprint"], judges=JUDGES,
        rules={r["from"]: r["to"][0] for r in EVAL_RULES["rules"]},
        work_dir=str(work), seconds=round(time.time() - t0, 1),
    )
    (work / "eval.json").write_text(json.dumps(summary, indent=1))
    return summary, rows


def cli(args) -> int:
    """`diffedit eval` (registered by shapes/cli.py)."""
    import sys

    from ..stages.config import FLAT_KEYS
    from .cli import EVAL_JOB_FLAGS

    edit = {k: getattr(args, k) for k in FLAT_KEYS if getattr(args, k, None) is not None}
    job = {k: getattr(args, k) for k in EVAL_JOB_FLAGS if getattr(args, k, None) is not None}
    summary, rows = run_eval(args.n, args.seed, args.model, args.out, edit, args.edit_seed, args.batch_size,
                             args.device, args.overwrite, log=lambda *a: print(*a, file=sys.stderr), job=job)
    if args.rows:
        summary["rows"] = rows
    print(json.dumps(summary, indent=1))
    return 0
