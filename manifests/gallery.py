"""A self-contained HTML gallery of a manifest: source | mask over source | edit, prompts, scores, status.

    write_gallery("out/")                       # -> out/gallery.html
    write_gallery("out/manifest/part-0.parquet", "edits.html", page_size=24)

One HTML file with everything inside it (images as data: URIs, inline CSS and JS, no network), so it can
be mailed or opened from any folder. Every card shows three images, in this order: the source (the image the
edit was made from, ``source_image``), the mask drawn in red over that source, and the edit. Images are
thumbnails (``thumb`` pixels on the long side). A row without a source image (a manifest older than schema
version 4, a null, unreadable bytes) shows a placeholder that says so in the source's place, and the mask over
the edit, captioned as such, in the middle. Each card's details give the image's size, the size the model
edited at where it differs, the composite mode and ``bg_changed_pixels``. Cards are sortable by any score,
filterable by status and by a score threshold, and paged, so a page holds ``page_size`` cards whatever the
manifest's size; the view lives in the URL fragment
(``gallery.html#status=ok&sort=clip_directional&desc=1&col=clip_image&op=%3E%3D&value=0.7&page=2``).

After each render the page writes a JSON summary (cards shown, images decoded, each card's figures in order,
errors caught) into the hidden ``#gallery-status`` element, which the tests read from a headless browser.

Reads the Parquet manifest with pyarrow only, a few rows at a time and only the columns it shows; the column
names are those of ``schema.py``: ``key``, ``edit_id``, ``source_prompt``, ``target_prompt``, ``status``,
``error``, ``source_image`` (or an older manifest's ``source_png`` / ``source_jpg``), ``mask_png``,
``edited_png`` or ``edited_jpg``, the details (``width``, ``height``, ``edit_width``, ``edit_height``,
``composite``, ``bg_changed_pixels``) and the score columns (every floating-point column).
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from .schema import missing
from .store import OutputStore

TEXT_COLUMNS = ("key", "edit_id", "source_prompt", "target_prompt", "status", "error")
# The images of a card, in the card's order, with the columns that may hold each (the first non-null one is
# shown: a manifest may have both edited_png and edited_jpg, one of them null in each row).
IMAGE_COLUMNS = {"source": ("source_image", "source_png", "source_jpg"), "mask": ("mask_png",),
                 "edit": ("edited_png", "edited_jpg")}
DETAIL_COLUMNS = ("width", "height", "edit_width", "edit_height", "composite", "bg_changed_pixels")
# pyarrow reads a row group's column chunks whole (a part of the job: one batch of rows), then hands them over in
# batches of READ_ROWS rows, each copied to Python bytes: memory grows with the largest part's images, never with
# the number of parts. Measured: parts of 64 rows with 4.2 MB sources (269 MB a part) peaked at 1.1 GB RSS with 8
# rows a batch, one part or six alike (2.0 and 2.3 GB with 64 rows a batch).
READ_ROWS = 8
READ_BUFFER = 1 << 20  # bytes: column chunks are read from the file in pieces of this size (as export.py reads them)
OVERLAY_RGB = np.array([255, 0, 64], dtype=np.float32)  # the mask's colour, drawn at 50% over the image
# Cards in one file: with 256-pixel thumbnails a card of a 512-pixel photo (source, mask over source, edit: three
# JPEGs) takes 57 to 72 KB (measured on scikit-image's chelsea, coffee and astronaut; 1000 cards made 71 MB, which
# headless chromium opened in about 14 s), so 500 cards keep the page quick to open. A larger manifest is counted
# in the header and shown in part; `limit=None` shows every row.
DEFAULT_LIMIT = 500


def manifest_files(source: str | Path) -> list[Path]:
    """The Parquet files of an output folder (its committed parts, as ``store.py`` finds them), of a folder of
    Parquet files, or one file. The gallery streams them a few rows at a time: images are read for the cards
    it shows only (``OutputStore.read`` would hold every row's images in memory at once)."""
    path = Path(source)
    if path.is_file():
        return [path]
    files = OutputStore(path).part_files() or (sorted(path.glob("*.parquet")) if path.is_dir() else [])
    if not files:
        raise FileNotFoundError(f"No Parquet manifest in {path}: neither an output folder with committed parts nor a "
                                "folder of .parquet files.")
    return files


def _thumbnail(data: bytes | None, thumb: int) -> Image.Image | None:
    """Decoded and shrunk; None for a missing image. Unreadable bytes raise (PIL's OSError / ValueError).
    ``thumbnail`` runs before the pixels are decoded, so a large JPEG source is decoded at a reduced scale."""
    if data is None:
        return None
    image = Image.open(io.BytesIO(data))
    image.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
    image.load()
    return image


def _data_uri(image: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buf, "JPEG", quality=85)
    else:
        image.save(buf, "PNG", optimize=True)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def overlay(base: Image.Image, mask: Image.Image) -> Image.Image:
    """``base`` with the mask (nonzero = edited) tinted red at 50%."""
    rgb = np.asarray(base.convert("RGB"), dtype=np.float32)
    m = np.asarray(mask.convert("L").resize(base.size, Image.Resampling.NEAREST)) > 127
    rgb[m] = 0.5 * rgb[m] + 0.5 * OVERLAY_RGB
    return Image.fromarray(rgb.round().astype(np.uint8))


def _number(value):
    """A score for JSON: None stays null, +-inf become strings JavaScript's Number() reads, NaN is null."""
    if missing(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return float(value)


def _detail(value):
    return None if missing(value) else (value if isinstance(value, str) else int(value))


def _card(row: dict, score_columns: list[str], image_columns: dict, thumb: int) -> dict:
    """One card's data: texts, scores, details, and its images as data: URIs by role (``source``, ``mask`` (the
    mask over the source), ``edit``); ``missing`` says why a role has no image, ``mask_over`` what the mask
    image is drawn over (``"source"``; ``"edit"`` or ``None``, the bare mask, where the row has no source)."""
    card = {c: (None if row.get(c) is None else str(row[c])) for c in TEXT_COLUMNS}
    card["scores"] = {c: _number(row.get(c)) for c in score_columns}
    card["details"] = {c: _detail(row.get(c)) for c in DETAIL_COLUMNS}
    images, problems, why = {}, [], {}
    for role, columns in image_columns.items():
        col = next((c for c in columns if row.get(c) is not None), None)
        images[role] = None
        if col is None:
            why[role] = f"no {role} image" + ("" if columns else " in this manifest")
            continue
        try:
            images[role] = _thumbnail(row[col], thumb)
        except (OSError, ValueError, SyntaxError) as exc:  # a corrupt image in the manifest: say so on its card
            problems.append(f"{col} unreadable: {exc}")
            why[role] = f"{role} image unreadable"
    source, mask, edit = images["source"], images["mask"], images["edit"]
    uris, card["mask_over"] = {}, None
    if source is not None:
        uris["source"] = _data_uri(source, "JPEG")
    if mask is not None:
        base = source if source is not None else edit
        if base is not None:
            uris["mask"] = _data_uri(overlay(base, mask), "JPEG")
            card["mask_over"] = "source" if source is not None else "edit"
        else:
            uris["mask"] = _data_uri(mask, "PNG")
    if edit is not None:
        uris["edit"] = _data_uri(edit, "JPEG")
    card["images"] = uris
    card["missing"] = {role: why.get(role, f"no {role} image") for role in IMAGE_COLUMNS if role not in uris}
    card["image_errors"] = problems
    return card


def _rows(files: list[Path], columns: list[str]):
    """The manifest's rows as dicts (only ``columns``), file after file, row group after row group, ``READ_ROWS``
    at a time: the images of the rows past ``limit`` are never read. A column a file lacks is missing from its
    rows."""
    for path in files:
        parquet = pq.ParquetFile(path, buffer_size=READ_BUFFER)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        for group in range(parquet.num_row_groups):
            for batch in parquet.iter_batches(batch_size=READ_ROWS, row_groups=[group], columns=present):
                yield from batch.to_pylist()


def read_cards(files: list[Path], thumb: int = 256, limit: int | None = DEFAULT_LIMIT) -> tuple[list[dict], dict]:
    """Cards for the first ``limit`` rows of the manifest, and a summary (rows by status, columns)."""
    # The columns of every file (footers only): a folder of Parquet files may mix older and newer schemas.
    fields: dict[str, pa.Field] = {}
    for path in files:
        for field in pq.read_schema(path):
            fields.setdefault(field.name, field)
    score_columns = [name for name, f in fields.items() if pa.types.is_floating(f.type)]
    image_columns = {role: [c for c in options if c in fields] for role, options in IMAGE_COLUMNS.items()}
    wanted = ([c for c in TEXT_COLUMNS + DETAIL_COLUMNS if c in fields] + score_columns
              + [c for cs in image_columns.values() for c in cs])
    # Every row is counted (from the status column alone); images are decoded for the first `limit` rows only.
    counts: dict[str, int] = {}
    total = 0
    for path in files:
        parquet = pq.ParquetFile(path)
        total += parquet.metadata.num_rows
        if "status" in parquet.schema_arrow.names:
            for item in pc.value_counts(parquet.read(columns=["status"]).column("status")).to_pylist():
                counts[str(item["values"])] = counts.get(str(item["values"]), 0) + item["counts"]
    rows = itertools.islice(_rows(files, wanted), limit)
    cards = [_card(row, score_columns, image_columns, thumb) for row in rows]
    summary = {
        "rows": total,
        "shown": len(cards),
        "by_status": counts,
        "scores": score_columns,
        "has_source": bool(image_columns["source"]),
        "files": [str(f) for f in files],
    }
    return cards, summary


def write_gallery(
    source: str | Path,
    html_path: str | Path | None = None,
    *,
    page_size: int = 50,
    thumb: int = 256,
    limit: int | None = DEFAULT_LIMIT,
    title: str = "diffedit gallery",
) -> Path:
    """Write the gallery of the manifest at ``source`` (an output folder, a folder of Parquet files, or one
    file) to ``html_path`` (default: ``gallery.html`` in the output folder) and return its path."""
    if page_size < 1:
        raise ValueError(f"`page_size` must be >= 1 but is {page_size}.")
    files = manifest_files(source)
    if html_path is None:
        src = Path(source)
        html_path = (src.parent if src.is_file() else src) / "gallery.html"
    cards, summary = read_cards(files, thumb=thumb, limit=limit)
    payload = json.dumps({"cards": cards, "summary": summary, "page_size": page_size}, allow_nan=False)
    payload = payload.replace("<", "\\u003c")  # no "</script>" can close the data block early
    page = PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)
    out = Path(html_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f4f4f5; color: #18181b; }
  header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: 8px 16px; z-index: 1; }
  h1 { font-size: 18px; margin: 0 0 4px; }
  #summary { color: #52525b; margin: 0 0 6px; }
  #controls { display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: center; }
  #controls label { white-space: nowrap; }
  #controls input[type=number] { width: 7em; }
  main { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 12px; padding: 12px 16px; }
  .card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px 10px; }
  .card.error { border-color: #dc2626; } .card.skipped { border-color: #a1a1aa; }
  .head { display: flex; justify-content: space-between; gap: 8px; color: #52525b; font-size: 12px; }
  .badge { font-weight: 600; } .badge.ok { color: #15803d; } .badge.error { color: #dc2626; } .badge.skipped { color: #71717a; }
  .prompts { margin: 4px 0; } .prompts .arrow { color: #71717a; margin: 0 4px; }
  .images { display: flex; gap: 6px; }
  figure { margin: 0; flex: 1; min-width: 0; text-align: center; }
  figure img { width: 100%; max-width: 256px; image-rendering: auto; background: #e4e4e7; }
  figcaption { font-size: 11px; color: #71717a; }
  .missing { box-sizing: border-box; width: 100%; max-width: 256px; min-height: 60px; margin: 0 auto; padding: 4px;
             display: flex; align-items: center; justify-content: center; font-size: 12px;
             color: #a1a1aa; background: #fafafa; border: 1px dashed #d4d4d8; }
  .details { font-size: 11px; color: #a1a1aa; margin-top: 2px; }
  table.scores { border-collapse: collapse; margin-top: 4px; font-size: 12px; font-variant-numeric: tabular-nums; }
  table.scores td { padding: 0 10px 0 0; } table.scores td.v { text-align: right; }
  .errmsg { color: #dc2626; white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; }
  nav { display: flex; gap: 8px; align-items: center; }
  #empty { padding: 24px 16px; color: #71717a; }
</style>
</head>
<body>
<header>
  <h1>__TITLE__</h1>
  <p id="summary"></p>
  <div id="controls">
    <label>status <select id="f-status"><option value="all">all</option></select></label>
    <label>sort by <select id="f-sort"><option value="">manifest order</option></select></label>
    <label><input type="checkbox" id="f-desc" checked> descending</label>
    <label>keep <select id="f-col"><option value="">(no threshold)</option></select>
      <select id="f-op"><option value="&gt;=">&ge;</option><option value="&lt;=">&le;</option></select>
      <input type="number" id="f-value" step="any"></label>
    <nav><button id="prev">&larr; prev</button><span id="pageinfo"></span><button id="next">next &rarr;</button></nav>
  </div>
</header>
<main id="cards"></main>
<div id="empty" hidden>No edit matches these filters.</div>
<pre id="gallery-status" hidden></pre>
<script type="application/json" id="gallery-data">__DATA__</script>
<script>
"use strict";
(function () {
  const errors = [];
  window.addEventListener("error", function (e) {
    const t = e.target;
    errors.push(t && t !== window && t.tagName ? "failed to load <" + t.tagName.toLowerCase() + ">" : String(e.message));
  }, true);
  window.addEventListener("unhandledrejection", function (e) { errors.push("unhandled rejection: " + String(e.reason)); });
  const consoleError = console.error.bind(console);
  console.error = function () { errors.push(Array.from(arguments).map(String).join(" ")); consoleError.apply(null, arguments); };

  const data = JSON.parse(document.getElementById("gallery-data").textContent);
  const cards = data.cards, summary = data.summary, pageSize = data.page_size;
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => { const n = document.createElement(tag); if (cls) n.className = cls; if (text != null) n.textContent = text; return n; };
  const num = (v) => (v === null || v === undefined ? null : Number(v));
  const fmt = (v) => { const x = num(v); return x === null ? "null" : (Number.isFinite(x) ? x.toFixed(Math.abs(x) >= 100 ? 1 : 3) : String(x)); };

  // Controls: statuses and score columns found in the manifest.
  const statuses = Object.keys(summary.by_status).sort();
  for (const s of statuses) $("f-status").append(new Option(s + " (" + summary.by_status[s] + ")", s));
  for (const c of summary.scores) { $("f-sort").append(new Option(c, c)); $("f-col").append(new Option(c, c)); }
  const parts = Object.entries(summary.by_status).map(([s, n]) => n + " " + s);
  $("summary").textContent = summary.rows + " rows (" + parts.join(", ") + ")" +
    (summary.shown < summary.rows ? "; this page holds the first " + summary.shown : "") +
    ". Each card: source | mask (red) over source | edit." +
    (summary.has_source ? "" : " This manifest has no source images: the mask is drawn over the edit.");

  const state = { status: "all", sort: "", desc: true, col: "", op: ">=", value: "", page: 1 };
  function readHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    for (const k of ["status", "sort", "col", "op", "value"]) if (p.has(k)) state[k] = p.get(k);
    if (p.has("desc")) state.desc = p.get("desc") !== "0";
    if (p.has("page")) state.page = Math.max(1, parseInt(p.get("page"), 10) || 1);
    $("f-status").value = state.status; $("f-sort").value = state.sort; $("f-desc").checked = state.desc;
    $("f-col").value = state.col; $("f-op").value = state.op; $("f-value").value = state.value;
  }
  function writeHash() {
    const p = new URLSearchParams();
    for (const k of ["status", "sort", "col", "op", "value"]) if (state[k] !== "" && !(k === "status" && state[k] === "all")) p.set(k, state[k]);
    p.set("desc", state.desc ? "1" : "0"); p.set("page", String(state.page));
    history.replaceState(null, "", "#" + p.toString());
  }

  function selected() {
    let rows = cards.map((c, i) => [c, i]);
    if (state.status !== "all") rows = rows.filter(([c]) => c.status === state.status);
    const t = parseFloat(state.value);
    if (state.col && Number.isFinite(t)) {
      rows = rows.filter(([c]) => { const v = num(c.scores[state.col]); return v !== null && (state.op === "<=" ? v <= t : v >= t); });
    }
    if (state.sort) {
      const k = state.sort, sign = state.desc ? -1 : 1;
      rows.sort(([a, i], [b, j]) => {
        const x = num(a.scores[k]), y = num(b.scores[k]);
        if (x === null || y === null) return (x === null) - (y === null) || i - j;  // nulls last
        return x === y ? i - j : (x < y ? -sign : sign);
      });
    }
    return rows.map(([c]) => c);
  }

  // One of a card's three images (role: source, mask, edit), or a placeholder that says why it has none.
  function figure(c, role, caption) {
    const f = el("figure");
    f.dataset.role = role;
    const uri = c.images[role];
    if (uri) { const img = new Image(); img.alt = caption; img.src = uri; f.append(img); }
    else {
      const m = el("div", "missing", (c.missing && c.missing[role]) || "no " + role + " image");
      const w = c.details && c.details.width, h = c.details && c.details.height;
      if (w > 0 && h > 0) m.style.aspectRatio = w + " / " + h;
      f.append(m);
    }
    f.append(el("figcaption", null, caption));
    return f;
  }
  function details(c) {
    const d = c.details || {}, parts = [];
    if (d.width != null && d.height != null) parts.push(d.width + "\u00d7" + d.height);
    if (d.edit_width != null && d.edit_height != null && (d.edit_width !== d.width || d.edit_height !== d.height))
      parts.push("edited at " + d.edit_width + "\u00d7" + d.edit_height);
    if (d.composite != null) parts.push("composite " + d.composite);
    if (d.bg_changed_pixels != null) parts.push(d.bg_changed_pixels + " px changed outside the edit region");
    if (!parts.length) return null;
    const n = el("div", "details", parts.join("  \u00b7  "));
    n.title = "image size; the size the model edited at; how the edit was put onto the source " +
      "(mask: the source outside the edit region, none: the whole decode); pixels outside the edit region that " +
      "differ from the source (bg_changed_pixels)";
    return n;
  }
  function cardNode(c) {
    const n = el("article", "card " + (c.status || ""));
    n.dataset.editId = c.edit_id || "";
    const head = el("div", "head");
    head.append(el("span", null, (c.key || "") + (c.edit_id ? "  ·  " + c.edit_id : "")), el("span", "badge " + (c.status || ""), c.status || ""));
    const prompts = el("div", "prompts");
    prompts.append(el("span", null, c.source_prompt || ""), el("span", "arrow", "\u2192"), el("b", null, c.target_prompt || ""));
    const images = el("div", "images");
    const maskCaption = c.mask_over === "edit" ? "mask over edit (no source)"
      : (c.images.mask && !c.mask_over ? "mask" : "mask over source");
    images.append(figure(c, "source", "source"), figure(c, "mask", maskCaption), figure(c, "edit", "edit"));
    n.append(head, prompts, images);
    const info = details(c);
    if (info) n.append(info);
    if (c.error) n.append(el("div", "errmsg", c.error));
    for (const p of c.image_errors || []) n.append(el("div", "errmsg", p));
    const table = el("table", "scores");
    for (const k of summary.scores) {
      const tr = el("tr"); tr.append(el("td", null, k), el("td", "v", fmt(c.scores[k]))); table.append(tr);
    }
    if (summary.scores.length) n.append(table);
    return n;
  }

  let renderId = 0;
  function render() {
    const rows = selected();
    const pages = Math.max(1, Math.ceil(rows.length / pageSize));
    state.page = Math.min(state.page, pages);
    const shown = rows.slice((state.page - 1) * pageSize, state.page * pageSize);
    const main = $("cards");
    main.replaceChildren(...shown.map(cardNode));
    $("empty").hidden = rows.length > 0;
    $("pageinfo").textContent = "page " + state.page + " / " + pages + " (" + rows.length + " edits)";
    $("prev").disabled = state.page <= 1; $("next").disabled = state.page >= pages;
    writeHash();
    const id = ++renderId;
    const imgs = Array.from(main.querySelectorAll("img"));
    Promise.all(imgs.map((img) => img.decode().then(() => img.naturalWidth > 0, () => false))).then((ok) => {
      if (id !== renderId) return;
      $("gallery-status").textContent = JSON.stringify({
        cards: shown.length, matching: rows.length, total: cards.length, rows: summary.rows, page: state.page, pages: pages,
        images: imgs.length, decoded: ok.filter(Boolean).length, widths: imgs.map((i) => i.naturalWidth),
        order: shown.map((c) => c.edit_id), errors: errors.slice(),
        // Each card's figures in page order: role, caption, the image's naturalWidth (null: a placeholder).
        figures: Array.from(main.querySelectorAll("article.card")).map((card) => Array.from(card.querySelectorAll("figure")).map((f) => {
          const img = f.querySelector("img");
          return { role: f.dataset.role, caption: f.querySelector("figcaption").textContent,
                   width: img ? img.naturalWidth : null, missing: img ? null : f.querySelector(".missing").textContent };
        })),
      });
      $("gallery-status").dataset.ready = "1";
    });
  }

  function onChange() {
    state.status = $("f-status").value; state.sort = $("f-sort").value; state.desc = $("f-desc").checked;
    state.col = $("f-col").value; state.op = $("f-op").value; state.value = $("f-value").value; state.page = 1;
    render();
  }
  for (const id of ["f-status", "f-sort", "f-desc", "f-col", "f-op"]) $(id).addEventListener("change", onChange);
  $("f-value").addEventListener("input", onChange);
  $("prev").addEventListener("click", () => { state.page -= 1; render(); window.scrollTo(0, 0); });
  $("next").addEventListener("click", () => { state.page += 1; render(); window.scrollTo(0, 0); });
  window.addEventListener("hashchange", () => { readHash(); render(); });
  readHash();
  render();
})();
</script>
</body>
</html>
"""
