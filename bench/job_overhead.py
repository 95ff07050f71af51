"""CPU cost of the job's Ray plumbing: `diffedit run` against edit_batch in-process, tiny model, same samples.

    python bench/job_overhead.py [--images 256] [--batch-size 16] [--work /tmp/job_overhead]

Both sides: the tiny 32x32 model (diffedit.stages.tiny), --steps 4 --mask-samples 2, fp32 on CPU, scores off,
one edit per sample, batches of --batch-size. In-process = decode PNGs + edit_batch + PNG-encode the outputs
(what the actor does). The job = the whole chain (read shards, prompts, actor, Parquet parts). Also reports
the driver's peak RSS, and rows/s between part commits in the first and second half of the job, to show
whether throughput stays steady while it streams.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

EDIT = dict(steps=4, mask_samples=2)


def write_shards(folder: Path, images: int, per_shard: int = 256) -> str:
    import webdataset as wds

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range((images + per_shard - 1) // per_shard):
        with wds.TarWriter(str(folder / f"bench-{s:06d}.tar")) as sink:
            for i in range(min(per_shard, images - s * per_shard)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(buf, "PNG")
                sink.write({"__key__": f"{s:06d}-{i:05d}", "png": buf.getvalue(), "txt": "a red circle"})
    (folder / "rules.yaml").write_text("rules:\n  - from: red\n    to: blue\n")
    return str(folder / "bench-*.tar")


def in_process(model_dir: Path, pattern: str, batch_size: int) -> dict:
    import glob

    import torch
    import webdataset as wds

    from diffedit.stages.config import EditConfig
    from diffedit.stages.editor import edit_batch
    from diffedit.stages.images import images_to_tensor, tensor_to_images
    from diffedit.stages.model import load_model

    torch.set_num_threads(1)  # the job's single CPU actor gets num_cpus=1
    model = load_model(str(model_dir), device="cpu", dtype=torch.float32)
    config = EditConfig.from_flat(model.recommended, **EDIT)
    samples = list(wds.WebDataset(sorted(glob.glob(pattern)), shardshuffle=False))
    t0 = time.time()
    for b in range(0, len(samples), batch_size):
        chunk = samples[b:b + batch_size]
        pils = [Image.open(io.BytesIO(s["png"])).convert("RGB") for s in chunk]
        out = edit_batch(model, images_to_tensor(pils, model.resolution), ["a red circle"] * len(chunk),
                         ["a blue circle"] * len(chunk), list(range(b, b + len(chunk))), config)
        for im in tensor_to_images(out.edited_BCHW, [p.size for p in pils]):
            im.save(io.BytesIO(), "PNG")
    seconds = time.time() - t0
    return dict(images=len(samples), seconds=round(seconds, 2), rows_per_s=round(len(samples) / seconds, 2))


def job(model_dir: Path, pattern: str, rules: str, out: Path, batch_size: int) -> dict:
    from diffedit.pipelines.job import JobOptions, run_job

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    summary = run_job(JobOptions(inputs=[pattern], output=str(out), model=str(model_dir), prompts=rules,
                                 edit=dict(EDIT), batch_size=batch_size, scores=False, rows_per_part=64),
                      log=lambda *a: None)
    wall = time.time() - t0
    import pyarrow.parquet as pq

    parts = sorted((p.stat().st_mtime, pq.read_metadata(p).num_rows) for p in (out / "manifest").glob("part-*.parquet"))
    half = len(parts) // 2  # rows/s between part commits, first half of the parts vs the second
    rate = [round(sum(n for _, n in ps[1:]) / max(ps[-1][0] - ps[0][0], 1e-9), 2) if len(ps) > 1 else None
            for ps in (parts[:half + 1], parts[half:])]
    return dict(wall_s=round(wall, 2), summary=summary, rows_per_s=round(summary["new_rows"] / wall, 2),
                parts=len(parts), rows_per_s_first_half_second_half=rate,
                driver_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--work", type=Path, default=Path("/tmp/job_overhead"))
    p.add_argument("--skip-in-process", action="store_true")
    args = p.parse_args(argv)
    from diffedit.stages.tiny import build_tiny_model

    model_dir = args.work / "tiny"
    if not model_dir.is_dir():
        build_tiny_model(model_dir)
    pattern = write_shards(args.work / f"shards-{args.images}", args.images)
    result = dict(images=args.images, batch_size=args.batch_size, edit=EDIT)
    if not args.skip_in_process:
        result["in_process"] = in_process(model_dir, pattern, args.batch_size)
    result["job"] = job(model_dir, pattern, str(args.work / f"shards-{args.images}" / "rules.yaml"),
                        args.work / "out", args.batch_size)
    if "in_process" in result:
        result["job_over_in_process"] = round(result["in_process"]["rows_per_s"] / result["job"]["rows_per_s"], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
