"""Edit quality: our defaults, the paper's ablations and diffusers' DiffEdit pipeline, on the same held-out scenes.

    python bench/quality.py [--n 16] [--model models/shapes-ldm] [--out docs/quality]

1. Our defaults through the real job (``diffedit eval``'s function ``shapes.eval.run_eval``): colour and shape
   edits of ``n`` held-out one-object scenes.
2. The same defaults in-process (``stages.editor.edit_batch``; must equal the job's edits), then the variants on
   the colour edits: no mask (SDEdit-like), plain noising instead of DDIM encoding, thresholds, encoding ratios,
   guidance scales, an empty reference text, identity edits (target = source) with the inferred mask and with
   no mask. Variants that change neither the mask's inputs nor its config reuse the default run's inferred
   masks (passed as user masks, which the engine pools back to exactly the same latent mask), and the
   thresholds re-binarise its soft maps (``normalize_map`` is soft > threshold): the same edits as running the
   engine with those flags, without re-running mask inference.
3. diffusers' ``StableDiffusionDiffEditPipeline`` with its defaults (mask guidance 7.5, inversion under the
   source prompt with guidance 7.5, decoding guidance 7.5, its own mask) on our model, per image.

Writes ``OUT/results.json``, ``OUT/tradeoff.png``, ``OUT/ablations.png``, ``OUT/examples.png`` and prints a
markdown table. docs/QUALITY.md shows and discusses them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness import diffusers_pipeline, timed, write_result

from diffedit.shapes import eval as ev
from diffedit.stages.config import EditConfig
from diffedit.stages.editor import SHIPPED_MODEL, edit_batch
from diffedit.stages.images import images_to_tensor, tensor_to_images
from diffedit.stages.mask import upsample_map
from diffedit.stages.model import load_model
from diffedit.stages.randomness import edit_seed

COLUMNS = [  # (key in a summary, header, format)
    ("color_success", "colour success", "{:.0%}"),
    ("shape_success", "shape success", "{:.0%}"),
    ("mask_iou", "mask IoU", "{:.3f}"),
    ("mask_fraction", "mask area", "{:.3f}"),
    ("psnr_bg", "PSNR bg", "{:.2f}"),
    ("psnr_bg4", "PSNR bg4", "{:.2f}"),
    ("psnr_image", "PSNR image", "{:.2f}"),
]


def engine(model, edits, config, batch_size, seed=0, masks=None, source_prompts=None):
    """Edit ``edits`` with ``edit_batch`` (per-edit seeds as the job derives them); returns (edited, mask, soft) lists."""
    res = model.resolution
    edited, masks_out, soft = [], [], []
    for a in range(0, len(edits), batch_size):
        chunk = edits[a : a + batch_size]
        images = images_to_tensor([Image.fromarray(e.scene.image) for e in chunk], res).to(model.device)
        sources = [e.source_prompt for e in chunk] if source_prompts is None else source_prompts[a : a + batch_size]
        user = None if masks is None else [torch.from_numpy(m) for m in masks[a : a + batch_size]]
        out = edit_batch(model, images, sources, [e.target_prompt for e in chunk],
                         [edit_seed(seed, e.key, e.edit_index) for e in chunk], config, masks=user)
        edited += [np.asarray(im) for im in tensor_to_images(out.edited_BCHW, [(res, res)] * len(chunk))]
        masks_out += list(upsample_map(out.mask_Bhw, (res, res)).cpu().numpy())
        soft += list(out.soft_Bhw.cpu().numpy())
    return edited, masks_out, soft


def diffusers_reference(model, edits, seed=0):
    """diffusers' StableDiffusionDiffEditPipeline with its defaults on our model, one image per call."""
    pipe = diffusers_pipeline(model)
    res = model.resolution
    edited, masks = [], []
    for e in edits:
        image = Image.fromarray(e.scene.image)
        g = torch.Generator().manual_seed(edit_seed(seed, e.key, e.edit_index))
        mask = pipe.generate_mask(image=image, source_prompt=e.source_prompt, target_prompt=e.target_prompt, generator=g)
        inverted = pipe.invert(prompt=e.source_prompt, image=image, generator=g).latents
        out = pipe(prompt=e.target_prompt, mask_image=mask, image_latents=inverted, generator=g, output_type="np").images[0]
        edited.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
        masks.append(upsample_map(torch.from_numpy(np.asarray(mask)).reshape(1, *mask.shape[-2:]) > 0.5, (res, res))[0].numpy())
    return edited, masks


def judged(edits, edited, masks, recon) -> tuple[dict, list[dict]]:
    rows = [ev.judge_edit(e, im, m, recon[e.key]) for e, im, m in zip(edits, edited, masks)]
    return ev.summarize(rows), rows


def table(results: dict) -> str:
    head = "| variant | edits | " + " | ".join(h for _, h, _ in COLUMNS) + " | seconds |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for name, r in results.items():
        s = r["summary"]
        kind = s["by_kind"].get("color") or s["by_kind"].get("identity")
        cells = []
        for key, _, fmt in COLUMNS:
            value = s.get(key) if key in ("shape_success",) else kind.get(key)
            cells.append("" if value is None else fmt.format(value))
        lines.append(f"| {name} | {s['n_edits']} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plots(results: dict, examples: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def color(name):
        s = results[name]["summary"]
        return (s["by_kind"].get("color") or s["by_kind"]["identity"])

    ceiling = color("ours (job)")["psnr_bg4_vae_ceiling"]
    # 1. The encoding-ratio trade-off (paper, Fig. 4): edit success vs background preservation.
    fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=90)
    ratios = [n for n in results if n.startswith("encode ratio ")]
    xs = [color(n)["psnr_bg4"] for n in ratios]
    ys = [color(n)["color_success"] for n in ratios]
    ax.plot(xs, ys, "o-", label="ours, encoding ratio r")
    for n, x, y in zip(ratios, xs, ys):
        ax.annotate(n.split()[-1], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for name, marker in (("no mask (SDEdit-like)", "s"), ("noising instead of DDIM", "^"), ("diffusers defaults", "x")):
        if name in results:
            ax.plot(color(name)["psnr_bg4"], color(name)["color_success"], marker, label=name)
    ax.axvline(ceiling, color="gray", ls="--", lw=1, label="VAE ceiling")
    ax.set_xlabel("PSNR outside the object + 4 px (dB)")
    ax.set_ylabel("colour-edit success")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("Encoding ratio: edit vs background", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png")
    plt.close(fig)

    # 2. Thresholds, guidance scales, reference text: success, mask IoU, PSNR gap to the ceiling.
    groups = [n for n in results if n.startswith(("threshold", "guidance", "reference text", "ours (in-process)"))]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), dpi=80, sharey=True)
    y = np.arange(len(groups))
    for ax, (key, label) in zip(axes, (("color_success", "colour success"), ("mask_iou", "mask IoU"),
                                       ("psnr_bg4", "PSNR bg4 (dB)"))):
        ax.barh(y, [color(n)[key] for n in groups], color="tab:blue")
        ax.set_title(label, fontsize=9)
        if key == "psnr_bg4":
            ax.axvline(ceiling, color="gray", ls="--", lw=1)
            ax.set_xlim(min(color(n)[key] for n in groups) - 2, ceiling + 1)
    axes[0].set_yticks(y, groups, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ablations.png")
    plt.close(fig)

    # 3. Examples: source, our mask, our edit, diffusers' mask, diffusers' edit (2x, nearest).
    rows = []
    for src, ours_mask, ours, ref_mask, ref in examples["images"]:
        cells = [src, np.repeat(ours_mask[..., None] * 255, 3, -1).astype(np.uint8), ours,
                 np.repeat(ref_mask[..., None] * 255, 3, -1).astype(np.uint8), ref]
        rows.append(np.concatenate([np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255) for c in cells], 1))
    grid = np.concatenate(rows, 0)
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 40, grid.shape[0] / 40 + 0.5), dpi=80)
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([33 + 66 * i for i in range(5)], ["source", "our mask", "ours", "diffusers' mask", "diffusers"], fontsize=8)
    ax.set_yticks([33 + 66 * i for i in range(len(rows))], examples["captions"], fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "examples.png")
    plt.close(fig)


def reference_only(n: int, model_path, out: Path) -> int:
    """diffusers' pipeline with its defaults on ``n`` held-out scenes, judged as ``diffedit eval`` judges ours."""
    model = load_model(model_path or SHIPPED_MODEL, device="cpu", dtype="fp32")
    held = ev.heldout_scenes(n)
    edits = ev.heldout_edits(held)
    recon = ev.vae_ceilings(model, held)
    run = timed(lambda: judged(edits, *diffusers_reference(model, edits), recon)[0], warmup=0)
    summary = dict(run.result, seconds=round(run.steady_s, 1))
    write_result(out / f"diffusers_n{n}.json", "cpu", **summary)
    print(json.dumps(summary, indent=1))
    return 0


def measure(args):
    """Steps 1-3 of the module docstring: (results by variant, the job's summary, the model, the defaults, the
    edits, and diffusers' edits and masks or None)."""
    results: dict[str, dict] = {}

    def record(name, summary, seconds, note=""):
        results[name] = dict(summary=summary, seconds=round(seconds, 1), note=note)
        s = summary["by_kind"].get("color") or summary["by_kind"].get("identity")
        print(f"{name}: colour {s['color_success']:.0%}, mask IoU {s['mask_iou']:.3f}, psnr_bg4 {s['psnr_bg4']:.2f} "
              f"({results[name]['seconds']:.0f} s)", file=sys.stderr, flush=True)

    # 1. Our defaults, through the real job.
    job = timed(lambda: ev.run_eval(args.n, model=args.model, out=tempfile.mkdtemp(prefix="quality-"), device="cpu",
                                    log=lambda *a: None), warmup=0)
    job_summary, job_rows = job.result
    record("ours (job)", job_summary, job.steady_s, "the real job, colour and shape edits")

    # 2. In-process: the defaults again (colour edits), then the variants.
    model = load_model(args.model or SHIPPED_MODEL, device="cpu", dtype="fp32")
    defaults = EditConfig.from_flat(model.recommended)
    held = ev.heldout_scenes(args.n)
    edits = ev.heldout_edits(held)
    color_edits = [e for e in edits if e.kind == "color"]
    recon = ev.vae_ceilings(model, held)
    bs = args.batch_size

    def variant(name, config=defaults, these=color_edits, masks=None, sources=None, note=""):
        if "ours (in-process)" in results and config == defaults and masks is d_masks and sources is None and these is color_edits:
            results[name] = {**results["ours (in-process)"], "note": "= ours (in-process)"}
            return None

        def edit_and_judge():
            edited, m, soft = engine(model, these, config, bs, masks=masks, source_prompts=sources)
            return edited, m, soft, judged(these, edited, m if masks is None else masks, recon)[0]

        run = timed(edit_and_judge, warmup=0)
        edited, m, soft, summary = run.result
        record(name, summary, run.steady_s, note)
        return edited, m, soft

    d_masks = None
    d_edited, d_masks, d_soft = variant("ours (in-process)", note="edit_batch; the job's colour edits, recomputed")
    job_color = {(r["key"], r["edit_index"]): r for r in job_rows if r["kind"] == "color"}
    # The job's actor runs torch on one thread, this process on several: floats differ in the last bits, so
    # an 8-bit pixel may round the other way. Record how far apart the two are.
    results["ours (in-process)"]["max_abs_psnr_bg4_diff_vs_job"] = max(
        abs(job_color[(e.key, e.edit_index)]["psnr_bg4"] - r["psnr_bg4"])
        for e, r in zip(color_edits, judged(color_edits, d_edited, d_masks, recon)[1]))
    res = model.resolution
    ones = [np.ones((res, res), bool)] * len(color_edits)
    variant("no mask (SDEdit-like)", masks=ones, note="all-ones mask")
    variant("noising instead of DDIM", defaults.replace(encode_method="noise"), masks=d_masks, note="encode_method=noise")
    for t in (0.25, 0.5, 0.75):
        thr = [upsample_map(torch.from_numpy(s[None]) > t, (res, res))[0].numpy() for s in d_soft]
        variant(f"threshold {t}", defaults.replace(threshold=t), masks=d_masks if t == defaults.mask.threshold else thr)
    for r in (0.5, 0.6, 0.7, 0.8, 0.9):
        variant(f"encode ratio {r}", defaults.replace(encode_ratio=r), masks=d_masks)
    for g in (1.5, 2.0, 3.0, 5.0, 7.5):
        variant(f"guidance {g}", defaults.replace(guidance=g), masks=d_masks)
    variant("reference text: empty", sources=[""] * len(color_edits), note="mask inference against the empty text")
    identity = ev.identity_edits(held)
    variant("identity (target = source)", these=identity)
    variant("identity, no mask", these=identity, masks=ones, note="DDIM encode r=0.8 + decode, all-ones mask")

    # 3. diffusers' pipeline with its defaults, colour and shape edits.
    ref_edited = ref_masks = None
    if not args.skip_diffusers:
        run = timed(lambda: diffusers_reference(model, edits), warmup=0)
        ref_edited, ref_masks = run.result
        summary, _ = judged(edits, ref_edited, ref_masks, recon)
        record("diffusers defaults", summary, run.steady_s, "StableDiffusionDiffEditPipeline, guidance 7.5 everywhere, its mask")
    return results, job_summary, model, defaults, edits, ref_edited, ref_masks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="held-out one-object scenes (default 16)")
    p.add_argument("--model", default=None, help="diffusers model folder (default: the shipped shapes model)")
    p.add_argument("--out", default="docs/quality", help="folder for results.json and the PNGs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--reference-only", type=int, metavar="N",
                   help="only diffusers' pipeline on N scenes (colour and shape edits): OUT/diffusers_nN.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.reference_only:
        return reference_only(args.reference_only, args.model, out)
    run = timed(lambda: measure(args), warmup=0)
    results, job_summary, model, defaults, edits, ref_edited, ref_masks = run.result
    bs, res = args.batch_size, model.resolution
    results_json = dict(
        n=args.n, scene_seed=ev.EVAL_SEED, model=str(args.model or SHIPPED_MODEL),
        model_fingerprint=job_summary["model_fingerprint"], defaults=defaults.flat(),
        torch_threads=torch.get_num_threads(), seconds=round(run.steady_s, 1), variants=results,
    )
    write_result(out / "results.json", "cpu", **results_json)

    # Examples: the first three colour edits and the first three shape edits.
    shown = [e for e in edits if e.kind == "color"][:3] + [e for e in edits if e.kind == "shape"][:3]
    ours_ex, ours_m, _ = engine(model, shown, defaults, bs)
    examples = dict(images=[], captions=[])
    for i, e in enumerate(shown):
        j = edits.index(e)
        ref = (ref_edited[j], ref_masks[j]) if ref_edited is not None else (np.zeros_like(e.scene.image), np.zeros((res, res), bool))
        examples["images"].append((e.scene.image, ours_m[i], ours_ex[i], ref[1], ref[0]))
        examples["captions"].append(f"{e.source_prompt.split(' on ')[0]} -> {e.target}")
    plots(results, examples, out)
    print(table(results))
    print(f"\nn = {args.n} scenes; model fingerprint {results_json['model_fingerprint'][:16]}; "
          f"{results_json['seconds']:.0f} s in total", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
