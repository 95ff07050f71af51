"""CPU cost of the job's Ray plumbing: `diffedit run` against edit_batch in-process, tiny model, same samples.

    python bench/job_overhead.py [--images 256] [--batch-size 16] [--work /tmp/job_overhead] [--out bench/results]

Both sides: the tiny 32x32 model (harness.py's model builder), --steps 4 --mask-samples 2, fp32 on CPU, scores
off, one edit per sample, batches of --batch-size. In-process = decode PNGs + edit_batch + PNG-encode the outputs
(what the actor does). The job = the whole chain (read shards, prompts, actor, Parquet parts). Also reports
the driver's peak RSS, and rows/s between part commits in the first and second half of the job, to show
whether throughput stays steady while it streams. Prints the result and writes job_overhead_<device>.json
under --out.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
from pathlib import Path

from PIL import Image

from harness import add_out_argument, model_folder, result_path, timed, write_result, write_shards

EDIT = dict(steps=4, mask_samples=2)


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

    def edit_all():
        for b in range(0, len(samples), batch_size):
            chunk = samples[b:b + batch_size]
            pils = [Image.open(io.BytesIO(s["png"])).convert("RGB") for s in chunk]
            out = edit_batch(model, images_to_tensor(pils, model.resolution), ["a red circle"] * len(chunk),
                             ["a blue circle"] * len(chunk), list(range(b, b + len(chunk))), config)
            for im in tensor_to_images(out.edited_BCHW, [p.size for p in pils]):
                im.save(io.BytesIO(), "PNG")

    seconds = timed(edit_all, warmup=0).steady_s
    return dict(images=len(samples), seconds=round(seconds, 2), rows_per_s=round(len(samples) / seconds, 2))


def job(model_dir: Path, pattern: str, rules: str, out: Path, batch_size: int) -> dict:
    from diffedit.pipelines.config import JobConfig
    from diffedit.pipelines.job import run_job

    shutil.rmtree(out, ignore_errors=True)
    config = JobConfig.from_flat([pattern], out, model=str(model_dir), prompts=rules, batch_size=batch_size,
                                 scores=False, **EDIT)
    job_timing = timed(lambda: run_job(config, log=lambda *a: None), warmup=0)
    summary, wall = job_timing.result, job_timing.steady_s
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
    p.add_argument("--work", type=Path, default=Path("/tmp/job_overhead"),
                   help="the model, the shards, the job's output")
    p.add_argument("--skip-in-process", action="store_true")
    add_out_argument(p)
    args = p.parse_args(argv)
    model_dir = model_folder("tiny", args.work)
    pattern = write_shards(args.work / f"shards-{args.images}", args.images, size=(40, 48), image_format="PNG",
                           caption="a red circle", rule=("red", "blue"), per_shard=256)
    result = dict(images=args.images, batch_size=args.batch_size, edit=EDIT)
    if not args.skip_in_process:
        result["in_process"] = in_process(model_dir, pattern, args.batch_size)
    result["job"] = job(model_dir, pattern, str(args.work / f"shards-{args.images}" / "rules.yaml"),
                        args.work / "out", args.batch_size)
    if "in_process" in result:
        result["job_over_in_process"] = round(result["in_process"]["rows_per_s"] / result["job"]["rows_per_s"], 2)
    print(json.dumps(result, indent=1))
    write_result(result_path("job_overhead", args.out, "cpu"), "cpu", **result)


if __name__ == "__main__":
    main()
