"""The whole `diffedit run` job on one GPU against the engine in-process, at SD 1.5 scale (issue 6 (c)),
and the scheduling path of two actors of 0.5 GPU each on the same GPU (issue 8's one-GPU check).

    python bench/bench_job_gpu.py [--out bench/results] [--images 96] [--batch-size 32]

SD 1.5's architecture with random weights (harness.py's model builder) is saved as a diffusers folder and loaded by
the job's actors like any checkpoint; shards of random 512x512 JPEGs are written with webdataset's writer.
Paper defaults (unconditional encoding), fp16, scores off (the CLIP would be the shapes one, meaningless here).
Both the engine and the job run eagerly, or with ``--compile`` both compiled (``DiffEditModel.compile``; the
job's ``--compile``, batches padded to one size), so the ratio measures the job's plumbing.

Besides wall-clock edits/s (start-up included), each job row reports its steady rate: the rows of the
committed Parquet parts between the first and the last, over the time between the first and the last-but-one
part's commit (file modification times), i.e. the job once Ray, the actor and the first batch are up.

    python bench/bench_job_gpu.py --images 480 --batch-size 32 --engine-batches 5 --variants c
    bash bench/on_gpu.sh python3 bench/bench_job_gpu.py --images 448 --batch-size 32 --engine-batches 3 \
        --variants c --compile

Where scoring should run (issue 5): the variant ``c-scores`` is ``c`` with the scores on, in the edit actor as
the job does it, with an SD-scale scorer: open_clip's ViT-L-14 and LPIPS' AlexNet with *random* weights saved
to safetensors files (timing only: their values are meaningless and are not reported). The steady-rate
difference is what scoring costs the GPU actor, so the most a separate scoring pool could win back.

    python bench/bench_job_gpu.py --images 256 --batch-size 32 --engine-batches 0 --variants c,c-scores

The job at a warm start (issue 20): the same job twice, each in a new Ray cluster with empty Inductor and Triton
caches, the second reading the compile cache the first wrote, then the engine from that cache:

    bash bench/on_gpu.sh python3 bench/bench_job_gpu.py --images 384 --engine-batches 2 --variants c,c --compile \
        --compile-cache DIR --fresh-caches --engine-last
    python bench/bench_job_gpu.py --tiny --images 48 --batch-size 8 --engine-batches 1 --variants c,c --compile \
        --compile-cache DIR --fresh-caches --engine-last        # a smoke run on CPU

Writes bench_job_gpu_<device>.json under --out, one row per variant as it finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness import SOURCE, TARGET, add_out_argument, model_folder, result_path, timed, write_result, write_shards

from diffedit.stages.config import EditConfig
from diffedit.stages.editor import edit_batch
from diffedit.stages.images import images_to_tensor
from diffedit.stages.model import load_model
from diffedit.stages.randomness import edit_seed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = "fp16" if DEVICE == "cuda" else "fp32"


def engine_rate(model_dir: Path, batch_size: int, batches: int, compile: bool, cache: str | None = None) -> float:
    """Edits/s of the engine in-process on one batch size, paper defaults, over ``batches`` batches after a warm-up;
    compiled with the graphs of the compile-cache folder ``cache`` when given."""
    model = load_model(model_dir, device=DEVICE, dtype=DTYPE, max_batch=64)
    if compile:
        if cache:
            from diffedit.stages.compile_cache import CompileCache
            CompileCache(cache, model.device).load()
        model.compile()
    rng = np.random.default_rng(0)
    res = model.resolution
    pil = [Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)) for _ in range(batch_size)]
    x = images_to_tensor(pil, res).to(model.device, model.dtype)
    seeds = [edit_seed(0, str(i), 0) for i in range(batch_size)]
    n = batch_size
    timing = timed(lambda: edit_batch(model, x, [SOURCE] * n, [TARGET] * n, seeds, EditConfig()), DEVICE,
                   repeats=batches)
    return n / timing.steady_s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_argument(p)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--engine-batches", type=int, default=None,
                   help="in-process batches timed (default: images / batch size; 0: skip the engine)")
    p.add_argument("--variants", default="c,two-gpus,half", help="job variants: c (1 actor x 1 GPU), c-scores (c with "
                   "SD-scale scores), two-gpus (2 actors x 1 GPU, where 2 GPUs exist), half (2 actors x 0.5 GPU on one GPU)")
    p.add_argument("--compile", action="store_true", help="compile the engine and the job's actors (static shapes)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="the jobs' --compile-cache (and the engine's graphs when it runs last): a variant listed twice "
                        "(c,c) starts from the graphs its first run wrote")
    p.add_argument("--fresh-caches", action="store_true",
                   help="each job (and the engine) in a new Ray cluster with empty Inductor and Triton caches, as on "
                        "a node that never compiled; with --compile-cache, what a second run on another node sees")
    p.add_argument("--engine-last", action="store_true", help="time the engine after the jobs (from their cache)")
    p.add_argument("--tiny", action="store_true", help="the test suite's tiny model on the CPU (a smoke run)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_job"), help="model, shards and job outputs")
    args = p.parse_args(argv)
    work = args.work
    model_dir = model_folder("tiny" if args.tiny else "sd15", work)
    size = (64, 64) if args.tiny else (512, 512)
    pattern = write_shards(work / "shards", args.images, size=size, image_format="JPEG", caption=SOURCE,
                           rule=("dog", "cat"), per_shard=16)
    rows = []

    def record(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_result(result_path("bench_job_gpu", args.out, DEVICE), DEVICE, rows=rows)

    # (b/d) the engine in-process, same images, same batch size, paper defaults.
    reps = max(1, args.images // args.batch_size) if args.engine_batches is None else args.engine_batches
    engine = {"eps": None}

    def time_engine():
        if args.fresh_caches:
            fresh_caches(work)
        engine["eps"] = engine_rate(model_dir, args.batch_size, reps, args.compile, args.compile_cache)
        torch.cuda.empty_cache()  # the engine's model is gone: its memory goes back before the job's actors start
        record(variant="(d) engine in-process, paper defaults" + (", compiled" if args.compile else ""),
               edits_per_s=engine["eps"], images=reps * args.batch_size)

    if reps and not args.engine_last:
        time_engine()

    # (c) the whole job, one actor on the GPU; then two actors of 0.5 GPU each.
    from diffedit.pipelines.config import JobConfig
    from diffedit.pipelines.job import run_job

    wanted = args.variants.split(",")
    variants = [(f"(c) diffedit run, 1 actor x 1 GPU{', run ' + str(i + 1) if wanted.count('c') > 1 else ''}",
                 dict(gpus_per_actor=1.0, num_gpus=1) if DEVICE == "cuda" else {}) for i in range(wanted.count("c"))]
    if "c-scores" in wanted:
        variants.append(("(c) with SD-scale scores in the actor (random-weight ViT-L-14 + AlexNet LPIPS, timing only)",
                         dict(gpus_per_actor=1.0, num_gpus=1, scores=True, **random_scorers(work))))
    if "two-gpus" in wanted and torch.cuda.device_count() >= 2:
        variants.append(("issue 8: diffedit run, 2 actors x 1 GPU", dict(gpus_per_actor=1.0, num_gpus=2)))
    if "half" in wanted:
        variants.append(("issue 8: diffedit run, 2 actors x 0.5 GPU", dict(gpus_per_actor=0.5, num_gpus=2)))
    for i, (name, kw) in enumerate(variants):
        out = work / f"out{i}"
        if args.compile_cache:
            kw = dict(kw, compile_cache=args.compile_cache)
        config = JobConfig.from_flat([pattern], out, model=str(model_dir), prompts=str(work / "shards" / "rules.yaml"),
                                     batch_size=args.batch_size, dtype=DTYPE, overwrite=True, compile=args.compile,
                                     **{"scores": False, **kw})
        if args.fresh_caches:
            fresh_caches(work)
        start = time.time()
        job = timed(lambda: run_job(config), warmup=0)  # the driver's wall clock: the GPUs are the actors'
        summary, wall = job.result, job.steady_s
        ok = summary["total_by_status"].get("ok", 0)
        steady = steady_rate(out / "manifest")
        row = dict(variant=name + (", compiled" if args.compile else ""), edits=ok, wall_s=wall, edits_per_s=ok / wall,
                   job_summary=summary, **steady, gpus=torch.cuda.device_count(), first_part_s=first_part_s(out, start))
        shares(row, engine["eps"])
        record(**row)
    if reps and args.engine_last:
        time_engine()
        for row in rows[:-1]:
            shares(row, engine["eps"])
        record(variant="(c) shares of the engine, from the engine timed last", shares={
            r["variant"]: [r["share_of_engine"], r["steady_share_of_engine"]] for r in rows[:-1]})


def shares(row: dict, engine_eps: float | None) -> None:
    """A job row's wall-clock and steady edits/s as shares of the engine's in-process rate."""
    steady = row.get("steady_edits_per_s")
    row["share_of_engine"] = row["edits_per_s"] / engine_eps if engine_eps else None
    row["steady_share_of_engine"] = steady / engine_eps if steady and engine_eps else None


def fresh_caches(work: Path) -> None:
    """A new Ray cluster whose processes start with empty Inductor and Triton caches (as on a new node)."""
    import tempfile

    import ray

    ray.shutdown()
    torch._dynamo.reset()
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        os.environ[var] = tempfile.mkdtemp(prefix=var.lower() + "-", dir=work)


def first_part_s(out: Path, start: float) -> float | None:
    """Seconds from the job's start to its first committed part: Ray, the actor's start and its first batch."""
    parts = sorted(f.stat().st_mtime for f in (out / "manifest").glob("*.parquet"))
    return parts[0] - start if parts else None


def random_scorers(work: Path) -> dict:
    """SD-scale scoring models with random weights in safetensors files, for timing the scorer only."""
    import open_clip
    import torchvision
    from safetensors.torch import save_file

    clip = open_clip.create_model("ViT-L-14")
    save_file({k: v.half().contiguous() for k, v in clip.state_dict().items()}, str(work / "clip_random.safetensors"))
    alex = torchvision.models.alexnet()
    save_file({k: v.contiguous() for k, v in alex.state_dict().items()}, str(work / "alexnet_random.safetensors"))
    return dict(clip_model="ViT-L-14", clip_weights=str(work / "clip_random.safetensors"),
                lpips_weights=str(work / "alexnet_random.safetensors"))


def steady_rate(manifest: Path) -> dict:
    """Rows of the parts between the first and the last, over the time from the first part's commit to the
    last-but-one's: the job once Ray, the actor and the first batch are up. The last part is left out: with two
    calls in flight per actor, the last two batches can reach the driver together (0.4 s apart in an H200 run,
    against 9.4 s between the others), which would shorten the span by up to a batch."""
    import pyarrow.parquet as pq

    parts = sorted((f.stat().st_mtime, pq.ParquetFile(f).metadata.num_rows) for f in manifest.glob("*.parquet"))
    if len(parts) < 3 or parts[-2][0] == parts[0][0]:
        return {"parts": len(parts), "steady_edits_per_s": None}
    rows = sum(n for _, n in parts[1:-1])
    return {"parts": len(parts), "steady_rows": rows, "steady_s": parts[-2][0] - parts[0][0],
            "steady_edits_per_s": rows / (parts[-2][0] - parts[0][0])}


if __name__ == "__main__":
    main()
