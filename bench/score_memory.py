"""Peak memory of scoring one edit: a 12-megapixel photo-like pair and a 1 x 300000 strip (issue item 12).

    python bench/score_memory.py [--scores OLD/scores.py] [--label after] [--cap-gb 12] [--no-lpips] [--cases ...]

Each case runs in a fresh subprocess (so peaks do not mix) that loads the pair as PIL images, builds a
``Scorer`` (the shipped shapes CLIP, on CPU) and scores the pair once; the peak is the child's ``ru_maxrss``
(read by the parent through ``os.wait4``, so it is known even for a child that was stopped). The line shows
the RSS before scoring (imports, models, the decoded pair) and the peak during it.

LPIPS: torchvision's AlexNet weights are not available offline, which makes ``lpips`` null; so that its memory
is measured too, the bench gives the scorer a *random* AlexNet as ``lpips_weights`` (the value is meaningless,
the activations' sizes are real). ``--no-lpips`` leaves it out.

``--scores`` scores with another copy of ``stages/scores.py`` (imported as a module of ``diffedit.stages``),
e.g. the code before the change, saved to /tmp. A child whose RSS passes ``--cap-gb`` is stopped (and its
address space is capped a few GB above that), so a runaway peak cannot take the machine down: its line then
says "over the cap". Prints one JSON line per case and writes them all to score_memory_<label>_<device>.json
under --out.

The photo: smooth multi-scale structure, edges and fine grain, 4000 x 3000; the edit is what the engine
returns for it: the photo through a 512 x 512 round trip (bicubic), with an elliptical region recoloured, and
that region as the mask.

Measured on a 2-core CPU machine (torch 2.14.1, Python 3.11), "before" being stages/scores.py of the commit
before the change copied to /tmp (``git show HEAD:stages/scores.py > /tmp/scores_before.py``):

    python bench/score_memory.py --cases photo-4000x3000 strip-1x300000 photo-1024x1024 photo-1600x1200
    python bench/score_memory.py --scores /tmp/scores_before.py --label before --cap-gb 10 --cases ...

| case            | before: peak RSS                                  | after: peak RSS (RSS before scoring) |
| --------------- | ------------------------------------------------- | ------------------------------------ |
| photo 4000x3000 | over 16 GB: a 15.9 GB allocation (conv2d's im2col) refused at the cap, at 5.7 GB | 1.26 GB (0.89 GB) |
| strip 1x300000  | 6.4 GB, 30.6 s                                    | 1.01 GB (0.79 GB), 0.1 s              |
| photo 1024x1024 | 2.6 GB, 7.5 s                                     | 1.18 GB (0.80 GB), 2.7 s              |
| photo 1600x1200 | 4.0 GB, 14.5 s                                    | 1.18 GB (0.81 GB), 3.2 s              |
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from harness import add_out_argument, result_path, timed, write_result

CASES = {"photo-4000x3000": (3000, 4000), "strip-1x300000": (1, 300000)}  # run by default
MORE_CASES = {"photo-1024x1024": (1024, 1024), "photo-1600x1200": (1200, 1600)}  # at and just above the limit


# -- the inputs ------------------------------------------------------------------------------------------


def photo_like(height: int, width: int, seed: int = 0) -> Image.Image:
    """Octaves of smooth random colour (bicubic upsampled noise), a few hard-edged shapes and fine grain."""
    rng = np.random.default_rng(seed)
    acc = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((4, 0.5), (16, 0.25), (64, 0.15), (256, 0.1)):
        small = rng.uniform(0, 255, (max(1, cells * height // width), cells, 3)).astype(np.uint8)
        acc += weight * np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    image = Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(1, max(2, min(height, width) // 6)))
        draw.rectangle((x - r, y - r // 2, x + r, y + r // 2), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    grain = rng.integers(-6, 7, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(image, np.int16) + grain, 0, 255).astype(np.uint8))


def engine_like_edit(source: Image.Image, resolution: int = 512) -> tuple[Image.Image, Image.Image]:
    """(edit, mask): the source through a resolution x resolution round trip, an ellipse recoloured."""
    w, h = source.size
    edit = source.resize((resolution, resolution), Image.Resampling.BICUBIC).resize((w, h), Image.Resampling.BICUBIC)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=255)
    recoloured = Image.fromarray(255 - np.asarray(edit))
    return Image.composite(recoloured, edit, mask), mask


def write_case(case: str, folder: Path) -> None:
    h, w = {**CASES, **MORE_CASES}[case]
    if h > 1:
        source = photo_like(h, w)
        edit, mask = engine_like_edit(source)
    else:  # the strip: random pixels, inverted in its middle third
        source = Image.fromarray(np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8))
        edit, mask = Image.fromarray(255 - np.asarray(source)), Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).rectangle((w // 3, 0, 2 * w // 3, 0), fill=255)
    for name, image in (("source", source), ("edit", edit), ("mask", mask)):
        image.save(folder / f"{case}-{name}.png")


# -- one case, in a child process -------------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(case: str, folder: Path, scores_path: str | None, lpips_weights: str | None) -> None:
    if scores_path:
        spec = importlib.util.spec_from_file_location("diffedit.stages._scores_under_test", scores_path)
        scores = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = scores
        spec.loader.exec_module(scores)
        scores.SHIPPED_CLIP = Path(__file__).resolve().parents[1] / "models" / "shapes-clip"  # not beside the copy
    else:
        from diffedit.stages import scores
    source, edit, mask = (Image.open(folder / f"{case}-{n}.png") for n in ("source", "edit", "mask"))
    for image in (source, edit, mask):
        image.load()
    scorer = scores.Scorer(scores.ScoreConfig(device="cpu", lpips_weights=lpips_weights))
    before = rss_mb()
    call = timed(lambda: scorer.score([source], [edit], [mask], ["a photo of a red car"], ["a photo of a blue car"]),
                 warmup=0)
    out = call.result
    print(json.dumps({"rss_before_mb": round(before), "seconds": round(call.steady_s, 2),
                      "scores": {k: None if v[0] is None else round(v[0], 4) for k, v in out.items()}}))


def run_case(case: str, folder: Path, scores_path: str | None, lpips_weights: str | None, cap_gb: float) -> dict:
    cap = int(cap_gb * 2**30)

    def limit_address_space():  # a hard stop a few GB above the cap (torch maps ~4 GB it never touches)
        resource.setrlimit(resource.RLIMIT_AS, (cap + 6 * 2**30, cap + 6 * 2**30))

    cmd = [sys.executable, __file__, "--child", case, "--folder", str(folder)]
    cmd += ["--scores", scores_path] if scores_path else []
    cmd += ["--lpips-weights", lpips_weights] if lpips_weights else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit_address_space)
    stopped = False
    while True:  # watch the child's RSS; stop it at the cap (wait4 reaps it with its own rusage)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            with open(f"/proc/{proc.pid}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (FileNotFoundError, ProcessLookupError):
            rss = 0
        if rss > cap and not stopped:
            os.kill(proc.pid, signal.SIGKILL)
            stopped = True
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    result = {"case": case, "peak_rss_mb": round(usage.ru_maxrss / 1024)}  # ru_maxrss is in KiB on Linux
    if stopped:
        result["error"] = f"over the cap: stopped at {cap_gb} GB RSS"
    elif proc.returncode != 0:
        result["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {proc.returncode}"
    else:
        result.update(json.loads(stdout.strip().splitlines()[-1]))
    return result


def random_alexnet(folder: Path) -> str:
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = folder / "random-alexnet.safetensors"
    save_file(torchvision.models.alexnet().state_dict(), str(path))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", help="a copy of stages/scores.py to measure instead of the package's")
    parser.add_argument("--label", default="after")
    parser.add_argument("--cap-gb", type=float, default=12.0, help="stop a child whose RSS passes this")
    parser.add_argument("--no-lpips", action="store_true", help="leave LPIPS out (null, as offline)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=[*CASES, *MORE_CASES])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--lpips-weights", help=argparse.SUPPRESS)
    add_out_argument(parser)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.folder), args.scores, args.lpips_weights)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        lpips_weights = None if args.no_lpips else random_alexnet(folder)
        for case in args.cases:
            write_case(case, folder)
            rows.append({"label": args.label, **run_case(case, folder, args.scores, lpips_weights, args.cap_gb)})
            print(json.dumps(rows[-1]), flush=True)
            write_result(result_path(f"score_memory_{args.label}", args.out, "cpu"), "cpu", cap_gb=args.cap_gb,
                         rows=rows)


if __name__ == "__main__":
    main()
