"""Peak memory of one edit actor on one large photo, scores on: decode, edit, composite, score, encode.

Runs the job's own EditActor in this process (no Ray), on the shipped model and the shipped CLIP, on a real
photograph (scikit-image's astronaut) upscaled to the size asked, and prints the process's peak resident set
size before and after the call. Each size runs in a fresh process, so peaks do not mix:

    python bench/actor_memory.py --size 4000x3000 --device cpu
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(size: tuple[int, int], device: str) -> dict:
    import numpy as np
    from PIL import Image
    from skimage import data

    from diffedit.manifests.schema import empty_row
    from diffedit.pipelines.actor import ActorOptions, EditActor
    from diffedit.stages.editor import SHIPPED_MODEL

    photo = Image.fromarray(data.astronaut()).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=92) if max(size) <= 65_500 else photo.save(buf, "PNG")  # JPEG's side limit
    actor = EditActor(ActorOptions(model=str(SHIPPED_MODEL), device=device, scores={}, max_pixels=64_000_000))
    loaded = peak_rss_mb()
    row = empty_row(key="photo", shard="bench.tar", edit_index=0, status="pending", seed=0, edit_id="x",
                    source_prompt="a red circle", target_prompt="a blue circle", _image=buf.getvalue(), _mask=None)
    import pyarrow as pa

    t0 = time.time()
    out = actor(pa.Table.from_pylist([row])).to_pylist()[0]
    return dict(size=f"{size[0]}x{size[1]}", megapixels=round(size[0] * size[1] / 1e6, 1), status=out["status"],
                error=out["error"], seconds=round(time.time() - t0, 1), peak_rss_after_loading_mb=round(loaded),
                peak_rss_mb=round(peak_rss_mb()), image_bytes=len(buf.getvalue()), device=device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", action="append", help="WxH (repeatable; default 1000x1000, 2000x2000, 4000x3000)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    sizes = args.size or ["1000x1000", "2000x2000", "4000x3000"]
    if args.child:
        w, h = map(int, sizes[0].split("x"))
        print(json.dumps(one((w, h), args.device)))
        return
    for s in sizes:
        proc = subprocess.run([sys.executable, __file__, "--child", "--size", s, "--device", args.device],
                              capture_output=True, text=True)
        print(proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else f"{s}: failed: {proc.stderr[-2000:]}")


if __name__ == "__main__":
    main()
