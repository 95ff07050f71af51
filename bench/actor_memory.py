"""Peak memory of one edit actor on one large photo, scores on: decode, edit, composite, score, encode.

Runs the job's own EditActor in this process (no Ray), on the shipped model and the shipped CLIP, on a real
photograph (scikit-image's astronaut) upscaled to the size asked, and prints the process's peak resident set
size before and after the call. Each size runs in a fresh process, so peaks do not mix:

    python bench/actor_memory.py --size 4000x3000 --device cpu

Prints one JSON line per size and writes them all to actor_memory_<device>.json under --out.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys

from harness import add_out_argument, result_path, timed, write_result


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(size: tuple[int, int], device: str) -> dict:
    import tempfile
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from skimage import data

    from diffedit.manifests.store import OutputStore
    from diffedit.pipelines.actor import EditActor, ExpandOptions, expand_sample
    from diffedit.pipelines.config import EngineConfig, OutputConfig, SamplingConfig
    from diffedit.pipelines.prompts import PromptSpec
    from diffedit.stages.config import EditConfig, ScoreConfig
    from diffedit.stages.editor import SHIPPED_MODEL

    photo = Image.fromarray(data.astronaut()).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=92) if max(size) <= 65_500 else photo.save(buf, "PNG")  # JPEG's side limit
    store = OutputStore(Path(tempfile.mkdtemp(prefix="actor_memory-")))
    store.parts.mkdir(parents=True)  # the actor stages its part there
    max_pixels = 64_000_000
    actor = EditActor(engine=EngineConfig(model=str(SHIPPED_MODEL), device=device), edit=EditConfig(),
                      scores=ScoreConfig(), output=OutputConfig(), sampling=SamplingConfig(), max_pixels=max_pixels,
                      output_dir=str(store.out))
    loaded = peak_rss_mb()
    # The job's own expansion of a sample into its pending edit (the default rules: red -> blue).
    sample = dict(key="photo", shard="bench.tar", image=buf.getvalue(), caption="a red circle", label=None, mask=None,
                  error=None)
    rows = expand_sample(sample, ExpandOptions(PromptSpec.default(), "txt", SamplingConfig()), frozenset())
    call = timed(lambda: actor(pa.Table.from_pylist(rows)).to_pylist()[0], warmup=0)
    out = pq.read_table(store.parts / call.result["part"], columns=["status", "error"]).to_pylist()[0]
    return dict(size=f"{size[0]}x{size[1]}", megapixels=round(size[0] * size[1] / 1e6, 1), status=out["status"],
                error=out["error"], seconds=round(call.steady_s, 1), peak_rss_after_loading_mb=round(loaded),
                peak_rss_mb=round(peak_rss_mb()), image_bytes=len(buf.getvalue()), device=device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", action="append", help="WxH (repeatable; default 1000x1000, 2000x2000, 4000x3000)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_out_argument(p)
    args = p.parse_args()
    sizes = args.size or ["1000x1000", "2000x2000", "4000x3000"]
    if args.child:
        w, h = map(int, sizes[0].split("x"))
        print(json.dumps(one((w, h), args.device)))
        return
    rows = []
    for s in sizes:
        proc = subprocess.run([sys.executable, __file__, "--child", "--size", s, "--device", args.device],
                              capture_output=True, text=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else dict(
            size=s, error=f"failed: {proc.stderr[-2000:]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_result(result_path("actor_memory", args.out, args.device), args.device, rows=rows)


if __name__ == "__main__":
    main()
