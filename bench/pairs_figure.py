"""docs/quality/pairs.png: source | mask over source | edit, as the gallery shows them, from real manifests.

    python bench/pairs_figure.py OUT [OUT ...] --to docs/quality/pairs.png [--rows 4] [--height 160]

Reads the ok rows of each job's manifest (the first ``--rows`` of each, in key order) and lays out one line per
edit: the source (``source_image``), the mask over the source, the edit, each scaled to ``--height`` px with its
aspect ratio kept, and the target prompt and sizes under the line. Everything shown is what the job wrote.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from diffedit.manifests.gallery import overlay

COLUMNS = ["key", "status", "source_prompt", "target_prompt", "width", "height", "edit_width", "edit_height",
           "source_image", "mask_png", "edited_png"]


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _line(row, height: int) -> Image.Image:
    source, mask, edit = _open(row.source_image), Image.open(io.BytesIO(row.mask_png)), _open(row.edited_png)
    tiles = [im.resize((max(1, height * im.width // im.height), height), Image.Resampling.LANCZOS)
             for im in (source, overlay(source, mask), edit)]
    gap, text_h = 6, 16
    line = Image.new("RGB", (sum(t.width for t in tiles) + gap * 2, height + text_h), "white")
    x = 0
    for t in tiles:
        line.paste(t, (x, 0))
        x += t.width + gap
    caption = f"-> {row.target_prompt!s}"
    caption = (caption if len(caption) <= 60 else caption[:57] + "...") + (
        f"   ({row.width}x{row.height}, edited at {row.edit_width}x{row.edit_height})")
    ImageDraw.Draw(line).text((2, height + 2), caption, fill="black")
    return line


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="+", help="job output folders")
    parser.add_argument("--to", required=True)
    parser.add_argument("--rows", type=int, default=4, help="edits per job")
    parser.add_argument("--height", type=int, default=160)
    args = parser.parse_args(argv)
    lines = []
    for out in args.outputs:
        df = pd.read_parquet(Path(out) / "manifest", columns=COLUMNS)
        ok = df[df.status == "ok"].sort_values("key").head(args.rows)
        lines += [_line(r, args.height) for r in ok.itertuples()]
    width = max(line.width for line in lines)
    header = Image.new("RGB", (width, 18), "white")
    ImageDraw.Draw(header).text((2, 2), "source | mask over source | edit", fill="black")
    figure = Image.new("RGB", (width, header.height + sum(line.height + 8 for line in lines)), "white")
    figure.paste(header, (0, 0))
    y = header.height
    for line in lines:
        figure.paste(line, (0, y))
        y += line.height + 8
    figure.save(args.to, optimize=True)
    print(f"{args.to}: {len(lines)} edits, {figure.width}x{figure.height}")


if __name__ == "__main__":
    main()
