"""Peak memory of `diffedit export` against the number of rows: it should stay flat (streaming).

    python bench/export_memory.py [--rows 1000 5000 10000] [--size 256] [--formats webdataset parquet]
                                  [--per-file 10000] [--export OLD/export.py --label before] [--json PATH]

For each row count, builds a synthetic manifest of that many ``ok`` rows through the real schema and
``OutputStore`` (parts of 64 rows, as ``--batch-size 64`` commits them): a photo-like source JPEG, its edit as a
PNG and a mask PNG at ``--size`` x ``--size`` (16 photo-like images, each row's rolled by its own offset and
encoded, so no two rows share bytes), a 63-bit seed, scores, the input's json. Then exports it in each format,
each export in a fresh subprocess; the peak is the child's ``ru_maxrss`` (read through ``os.wait4``). The table
shows the child's RSS after its imports ("before": ``webdataset`` imports torch, about 0.5 GB; the Parquet
export does not import it) and its peak during the export.

``--export`` measures another copy of ``manifests/export.py`` instead (imported as a module of
``diffedit.manifests``), e.g. the code before streaming: ``git show REV:manifests/export.py > OLD/export.py``.
It is called as ``export(out, to)``; its format is whatever it writes.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PART_ROWS = 64  # rows per committed part
POOL = 16  # distinct images


def photo_like(size: int, seed: int) -> Image.Image:
    """Octaves of smooth random colour, a few hard-edged shapes and fine grain."""
    rng = np.random.default_rng(seed)
    acc = np.zeros((size, size, 3), np.float32)
    for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.2)):
        small = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        acc += weight * np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    image = Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = (int(v) for v in rng.integers(0, size, 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rectangle((x - r // 4, y - r // 8, x + r // 4, y + r // 8), fill=colour)
    grain = rng.integers(-3, 4, (size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(image, np.int16) + grain, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    return buf.getvalue()


def image_pool(size: int) -> list[tuple[Image.Image, Image.Image, bytes]]:
    """(source, edit, mask PNG) x POOL: each row encodes its own shifted copy, so no two rows share bytes (Parquet
    would store repeated values once)."""
    pool = []
    for i in range(POOL):
        source = photo_like(size, i)
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=255)
        edited = Image.composite(Image.fromarray(255 - np.asarray(source)), source, mask)
        pool.append((source, edited, encoded(mask, "PNG")))
    return pool


def row_images(pool, i: int) -> tuple[bytes, bytes, bytes]:
    """Row ``i``'s (source JPEG, edited PNG, mask PNG): a pool pair rolled by ``i // POOL`` pixels."""
    source, edited, mask = pool[i % POOL]
    shift = lambda im: Image.fromarray(np.roll(np.asarray(im), i // POOL, axis=1))  # noqa: E731
    return encoded(shift(source), "JPEG"), encoded(shift(edited), "PNG"), mask


def build_manifest(out: Path, rows: int, size: int, pool) -> None:
    from diffedit.manifests.schema import empty_row
    from diffedit.manifests.store import OutputStore

    store = OutputStore(out)
    store.begin(dict(edit=dict(steps=50, guidance=7.5), model="/models/sd15", model_fingerprint="0" * 64,
                     sampling=dict(seed=0, samples_per_edit=1), schema_version="4"))
    for start in range(0, rows, PART_ROWS):
        part = []
        for i in range(start, min(rows, start + PART_ROWS)):
            source, edited, mask = row_images(pool, i)
            part.append(empty_row(
                key=f"{i:09d}", edit_id=f"{i:020x}", edit_index=0, sample_index=0, best=True,
                shard=f"/data/shard-{i // 1000:05d}.tar", source_prompt="a photo of a dog on a red sofa",
                target_prompt="a photo of a cat on a red sofa", status="ok", seed=(2**62 + i * 7919) % 2**63,
                width=size, height=size, edit_width=512, edit_height=512, composite="mask", bg_changed_pixels=0,
                input_json=json.dumps({"url": f"https://example.com/{i}.jpg", "caption": "a dog on a sofa"}),
                source_image=source, mask_png=mask, mask_inferred=True, mask_fraction=0.2, edited_png=edited,
                clip_directional=0.2, clip_image=0.8, psnr_bg=float("inf"), ssim_bg=1.0))
        store.commit(part)
    store.finish({})
    store.close()


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


# -- one export, in a child process -----------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(out: str, to: str, fmt: str, per_file: int, export_path: str | None) -> None:
    if export_path:
        spec = importlib.util.spec_from_file_location("diffedit.manifests._export_under_test", export_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        call = lambda: module.export(out, to)  # noqa: E731
    else:
        from diffedit.manifests import export as module

        call = lambda: module.export(out, to, format=fmt, max_pairs=per_file)  # noqa: E731
    if fmt != "parquet":
        import webdataset  # noqa: F401  (the export imports it, and with it torch: counted in "before")
    before = rss_mb()
    t0 = time.perf_counter()
    result = call()
    print(json.dumps({"rss_before_mb": round(before), "seconds": round(time.perf_counter() - t0, 2),
                      "exported": result["exported"]}))


def run_export(out: Path, to: Path, fmt: str, per_file: int, export_path: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(out), str(to), fmt, str(per_file)]
    cmd += ["--export", export_path] if export_path else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the export failed: {stderr.strip().splitlines()[-1] if stderr.strip() else status}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "output_mb": round(folder_mb(to))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--formats", nargs="+", default=["webdataset", "parquet"], choices=["webdataset", "parquet"])
    parser.add_argument("--per-file", type=int, default=10_000, help="export's --per-file (pairs a shard or file)")
    parser.add_argument("--export", help="a copy of manifests/export.py to measure instead of the package's")
    parser.add_argument("--label", default="after")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out, to, fmt, per_file = args.child
        child(out, to, fmt, int(per_file), args.export)
        return
    pool, results = image_pool(args.size), []
    source, edited, mask = row_images(pool, 0)
    print(f"images {args.size}x{args.size}: source JPEG {len(source) / 1024:.0f} KiB, edit PNG "
          f"{len(edited) / 1024:.0f} KiB, mask PNG {len(mask) / 1024:.1f} KiB (row 0)", flush=True)
    print("| label | rows | format | manifest MB | output MB | seconds | RSS before MB | peak RSS MB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory(prefix="export-memory-") as tmp:
        for rows in args.rows:
            out = Path(tmp) / f"out-{rows}"
            build_manifest(out, rows, args.size, pool)
            for fmt in (["old"] if args.export else args.formats):
                r = dict(label=args.label, rows=rows, format=fmt, manifest_mb=round(folder_mb(out)),
                         **run_export(out, Path(tmp) / f"to-{rows}-{fmt}", fmt, args.per_file, args.export))
                results.append(r)
                print(f"| {r['label']} | {rows:,} | {fmt} | {r['manifest_mb']:,} | {r['output_mb']:,} | "
                      f"{r['seconds']} | {r['rss_before_mb']} | {r['peak_rss_mb']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(size=args.size, results=results), indent=1))


if __name__ == "__main__":
    main()
