"""The HTML gallery, opened in a real headless browser (Debian's chromium).

The page writes a JSON summary of what it rendered (cards, images decoded, each card's figures in order,
errors caught by window.onerror and console.error) into ``#gallery-status``; ``chromium --dump-dom`` hands us
the DOM after the page ran. Skipped, with the reason, where chromium is not installed or cannot start.
"""

import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffedit.manifests import schema
from diffedit.manifests.gallery import manifest_files, read_cards, write_gallery
from diffedit.manifests.store import OutputStore

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
STATUS = re.compile(r'<pre id="gallery-status"[^>]*data-ready="1"[^>]*>(.*?)</pre>', re.S)


def find_chromium():
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def dump_dom(browser, url, profile, budget_ms=5000):
    run = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    return run.stdout, run.stderr


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    path = find_chromium()
    if path is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    probe = tmp_path_factory.mktemp("probe") / "probe.html"
    probe.write_text("<p id=probe></p><script>document.getElementById('probe').textContent = 'script ran'</script>")
    try:
        out, err = dump_dom(path, probe.as_uri(), tmp_path_factory.mktemp("profile"))
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"chromium at {path} cannot run here: {exc}")
    if "script ran" not in out:
        pytest.skip(f"chromium at {path} cannot run here: {err.strip()[-500:]}")
    return path


def png(array):
    return encode(array, "PNG")


def encode(array, fmt, **options):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **options)
    return buf.getvalue()


TRIPLE = (["source", "mask", "edit"], ["source", "mask over source", "edit"])


def roles_and_captions(figures):
    return [f["role"] for f in figures], [f["caption"] for f in figures]


def decode_uri(uri):
    """A data: URI of the page as an RGB array."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"), dtype=int)


def make_manifest(out_dir, n_ok=7, n_error=2, n_skipped=1, source="source_image", seed=0):
    """A manifest as DESIGN.md describes it, written with pyarrow alone, split over two Parquet files. ``source``
    names the source image column (``source_image``; an older manifest's ``source_png``) or is None: a manifest
    from before schema version 4, without source images."""
    rng = np.random.default_rng(seed)
    rows = []
    statuses = ["ok"] * n_ok + ["error"] * n_error + ["skipped"] * n_skipped
    for i, status in enumerate(statuses):
        h, w = (48, 64) if i % 2 else (64, 64)
        ok = status == "ok"
        mask = np.zeros((h, w), np.uint8)
        mask[8:30, 10 + i : 40] = 255
        row = {
            "key": f"sample-{i:04d}", "edit_id": f"edit-{i:02d}", "shard": "shapes-000000.tar",
            "source_prompt": "a red circle", "target_prompt": f"a blue circle {i}", "status": status,
            "error": None if ok else f"cannot decode image </script><b>{i}</b>",
            "seed": i, "width": w, "height": h,
            "mask_png": png(mask) if ok else None,
            "mask_fraction": float((mask > 0).mean()) if ok else None,
            "edited_png": png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) if ok else None,
            "clip_source": float(rng.uniform(0, 0.3)) if ok else None,
            "clip_target": float(rng.uniform(0, 0.3)) if ok else None,
            "clip_directional": (float(rng.uniform(-0.4, 0.6)) if i != 3 else None) if ok else None,
            "clip_image": float(rng.uniform(0.5, 1)) if ok else None,
            "lpips": None,
            "psnr_bg": (float(rng.uniform(15, 40)) if i != 5 else float("inf")) if ok else None,
        }
        if source:
            row[source] = png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) if ok else None
        rows.append(row)
    schema = pa.schema(
        [("key", pa.string()), ("edit_id", pa.string()), ("shard", pa.string()), ("source_prompt", pa.string()),
         ("target_prompt", pa.string()), ("status", pa.string()), ("error", pa.string()), ("seed", pa.int64()),
         ("width", pa.int32()), ("height", pa.int32()), ("mask_png", pa.binary()), ("mask_fraction", pa.float32()),
         ("edited_png", pa.binary())]
        + [(c, pa.float32()) for c in ("clip_source", "clip_target", "clip_directional", "clip_image", "lpips")]
        + [("psnr_bg", pa.float64())]
        + ([(source, pa.binary())] if source else [])
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    folder = Path(out_dir) / "manifest"
    folder.mkdir(parents=True)
    half = len(rows) // 2
    pq.write_table(table.slice(0, half), folder / "part-00000.parquet")
    pq.write_table(table.slice(half), folder / "part-00001.parquet")
    return table


def page_status(browser, page, profile, fragment=""):
    # Image decoding runs off the page's virtual clock: on a busy machine the status may come after the
    # first budget, so a page that has not reported yet gets longer budgets before it counts as failed.
    for budget_ms in (5000, 20000, 60000):
        out, err = dump_dom(browser, page.as_uri() + fragment, profile, budget_ms)
        match = STATUS.search(out)
        if match:
            break
    assert match, f"the page wrote no status (did its script fail?); chromium said: {err.strip()[-1000:]}"
    status = json.loads(html.unescape(match.group(1)))
    assert "Uncaught" not in err, err
    return status, out


def test_gallery_in_a_headless_browser(browser, tmp_path):
    table = make_manifest(tmp_path / "out")
    page = write_gallery(tmp_path / "out", page_size=4)
    assert page == tmp_path / "out" / "gallery.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained: nothing to fetch
    profile = tmp_path / "profile"

    # Page 1 of all 10 rows: 4 cards of source | mask over source | edit, all decoded, no error.
    status, dom = page_status(browser, page, profile)
    assert status["errors"] == []
    assert (status["cards"], status["matching"], status["pages"], status["rows"]) == (4, 10, 3, 10)
    assert status["images"] == 12 and status["decoded"] == 12 and all(w > 0 for w in status["widths"])
    for figures in status["figures"]:
        assert roles_and_captions(figures) == TRIPLE and all(f["width"] > 0 for f in figures)
    assert status["order"] == ["edit-00", "edit-01", "edit-02", "edit-03"]
    assert "<b>0</b>" not in dom  # an error message is text, never markup

    # The last page holds the rest; error and skipped rows have no images: three placeholders each.
    status, _ = page_status(browser, page, profile, "#page=3")
    assert (status["cards"], status["images"]) == (2, 0)
    assert status["order"] == ["edit-08", "edit-09"]
    for figures in status["figures"]:
        assert [f["role"] for f in figures] == TRIPLE[0] and all(f["width"] is None and f["missing"] for f in figures)

    # Filter by status, sort by a score (descending, nulls last, inf first).
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    by_psnr = sorted(ok, key=lambda r: -r["psnr_bg"])
    status, _ = page_status(browser, page, profile, "#status=ok&sort=psnr_bg&desc=1")
    assert status["matching"] == 7 and status["order"] == [r["edit_id"] for r in by_psnr[:4]]
    assert status["order"][0] == "edit-05"  # the +inf PSNR
    assert status["decoded"] == 12 and all(roles_and_captions(f) == TRIPLE for f in status["figures"])
    status, _ = page_status(browser, page, profile, "#status=ok&sort=clip_directional&desc=0&page=2")
    with_value = sorted((r for r in ok if r["clip_directional"] is not None), key=lambda r: r["clip_directional"])
    expected = [r["edit_id"] for r in with_value] + ["edit-03"]  # the null sorts last
    assert status["order"] == expected[4:8]

    # A score threshold keeps the rows at or above it (nulls never pass).
    threshold = 0.2
    kept = [r["edit_id"] for r in rows if r["clip_directional"] is not None and r["clip_directional"] >= threshold]
    assert 0 < len(kept) < 7
    status, _ = page_status(browser, page, profile, f"#col=clip_directional&op=%3E%3D&value={threshold}")
    assert status["matching"] == len(kept) and status["order"] == kept[:4]
    status, _ = page_status(browser, page, profile, "#status=skipped")
    assert (status["matching"], status["order"]) == (1, ["edit-09"])


def job_rows(n=4, seed=2):
    """Rows of the job's own schema (manifests/schema.py, version 4): each ok row's source_image in another of
    the formats the job stores (the input's JPEG, PNG or WebP bytes), a JPEG edit (edited_png null), the edit
    sizes, composite and bg_changed_pixels; then one error row."""
    rng = np.random.default_rng(seed)
    formats = [("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {"quality": 90}), ("JPEG", {})]
    rows = []
    for i in range(n):
        h, w = (48, 80) if i % 2 else (64, 64)
        fmt, options = formats[i % len(formats)]
        mask = np.zeros((h, w), np.uint8)
        mask[10:40, 10:40] = 255
        rows.append(schema.empty_row(
            key=f"k{i}", edit_id=f"e{i}", edit_index=0, sample_index=0, shard="s.tar", source_prompt="a red circle",
            target_prompt="a blue circle", status="ok", seed=i, width=w, height=h,
            edit_width=96 if i % 2 else 64, edit_height=64, composite="mask", feather=4, bg_changed_pixels=0,
            source_image=encode(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), fmt, **options),
            mask_png=png(mask), mask_fraction=float((mask > 0).mean()),
            edited_jpg=encode(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "JPEG"),
            clip_directional=0.1 * i, ssim_bg=0.9,
        ))
    rows.append(schema.empty_row(key=f"k{n}", edit_id=f"e{n}", edit_index=0, shard="s.tar", status="error",
                                 error="cannot decode image"))
    return rows


def commit(out, rows):
    """The rows as one committed part of the output folder ``out``, as the job writes them."""
    store = OutputStore(out)
    store.parts.mkdir(parents=True, exist_ok=True)
    return store.commit(rows)


def test_gallery_of_the_job_schema_shows_source_mask_over_source_edit(browser, tmp_path):
    """Schema version 4: every ok card's three images load, in the order source, mask over source, edit; a row
    whose source_image is null shows a placeholder in its place and the mask over the edit, captioned so."""
    rows = job_rows()
    rows[3]["source_image"] = None
    commit(tmp_path / "out", rows)
    page = write_gallery(tmp_path / "out")
    status, dom = page_status(browser, page, tmp_path / "profile")
    assert status["errors"] == [] and status["cards"] == 5 and status["order"] == ["e0", "e1", "e2", "e3", "e4"]
    assert status["images"] == 3 * 3 + 2 and status["decoded"] == 11
    for figures in status["figures"][:3]:  # JPEG, PNG and WebP sources
        assert roles_and_captions(figures) == TRIPLE
        assert all(f["width"] > 0 and f["missing"] is None for f in figures)
    no_source = status["figures"][3]
    assert roles_and_captions(no_source) == (TRIPLE[0], ["source", "mask over edit (no source)", "edit"])
    assert no_source[0]["width"] is None and no_source[0]["missing"] == "no source image"
    assert no_source[1]["width"] > 0 and no_source[2]["width"] > 0
    error = status["figures"][4]
    assert [f["missing"] for f in error] == ["no source image", "no mask image", "no edit image"]
    # The details: the size, the edit size where it differs, composite and bg_changed_pixels.
    assert "80×48  ·  edited at 96×64  ·  composite mask  ·  0 px changed outside the edit region" in dom
    assert "64×64  ·  composite mask" in dom and "edited at 64×64" not in dom

    # Sorting by a score keeps each card's triple.
    status, _ = page_status(browser, page, tmp_path / "profile", "#status=ok&sort=clip_directional&desc=1")
    assert status["order"] == ["e3", "e2", "e1", "e0"] and status["decoded"] == 11
    assert [roles_and_captions(f)[0] for f in status["figures"]] == [TRIPLE[0]] * 4


def test_gallery_of_a_manifest_without_source_images(browser, tmp_path):
    """A manifest from before schema version 4 (no source column): placeholders, the mask over the edit, no error."""
    make_manifest(tmp_path / "out", n_ok=3, n_error=1, n_skipped=0, source=None)
    page = write_gallery(tmp_path / "out")
    status, dom = page_status(browser, page, tmp_path / "profile")
    assert status["errors"] == [] and status["cards"] == 4
    assert status["images"] == 6 and status["decoded"] == 6
    for figures in status["figures"][:3]:
        assert [f["caption"] for f in figures] == ["source", "mask over edit (no source)", "edit"]
        assert figures[0]["missing"] == "no source image in this manifest" and figures[0]["width"] is None
        assert figures[1]["width"] > 0 and figures[2]["width"] > 0
    assert "This manifest has no source images" in dom


def test_gallery_with_legacy_source_column_and_a_broken_image(browser, tmp_path):
    make_manifest(tmp_path / "out", n_ok=3, n_error=0, n_skipped=0, source="source_png")
    page = write_gallery(tmp_path / "out" / "manifest", tmp_path / "g.html", page_size=50)
    status, _ = page_status(browser, page, tmp_path / "profile")
    assert status["errors"] == [] and status["cards"] == 3
    assert status["images"] == 9 and status["decoded"] == 9  # source, mask over source, edit
    assert all(roles_and_captions(f) == TRIPLE for f in status["figures"])

    # The check can fail: the same page with one image's bytes broken reports it.
    broken = tmp_path / "broken.html"
    text = page.read_text()
    start = text.index("data:image/jpeg;base64,") + len("data:image/jpeg;base64,")
    broken.write_text(text[:start] + "AAAA" + text[start + 4 :])
    status, _ = page_status(browser, broken, tmp_path / "profile")
    assert status["images"] == 9 and status["decoded"] == 8
    assert status["figures"][0][0]["width"] == 0  # the first card's source


def test_mask_is_drawn_over_the_source_not_the_edit(tmp_path):
    """A black source, a white edit: outside the mask the overlay is black (the source's), inside it the red
    tint over black; without a source it falls back to the edit, and says so."""
    h, w = 64, 96
    mask = np.zeros((h, w), np.uint8)
    mask[16:48, 24:72] = 255
    black, white = np.zeros((h, w, 3), np.uint8), np.full((h, w, 3), 255, np.uint8)
    rows = [schema.empty_row(key=f"k{i}", edit_id=f"e{i}", edit_index=0, status="ok", width=w, height=h,
                             edit_width=w, edit_height=h, composite="none", bg_changed_pixels=w * h,
                             source_image=encode(black, "JPEG") if i == 0 else None, mask_png=png(mask),
                             edited_png=png(white)) for i in range(2)]
    commit(tmp_path / "out", rows)
    (with_source, without), summary = read_cards(manifest_files(tmp_path / "out"))
    assert summary["has_source"] and set(with_source["images"]) == {"source", "mask", "edit"}
    assert with_source["mask_over"] == "source" and with_source["missing"] == {}
    over = decode_uri(with_source["images"]["mask"])
    assert over.shape == (h, w, 3)
    inside = np.zeros((h, w), bool)
    inside[18:46, 26:70] = True  # the mask, less a JPEG-ringing margin
    outside = np.ones((h, w), bool)
    outside[13:51, 21:75] = False
    assert over[outside].max() <= 40  # black-ish: the source's pixels, never the white edit's
    assert np.abs(over[inside].mean(0) - [128, 0, 32]).max() <= 12  # the red tint at 50% over black
    assert decode_uri(with_source["images"]["source"]).max() <= 40
    assert decode_uri(with_source["images"]["edit"]).min() >= 215
    assert with_source["details"] == {"width": w, "height": h, "edit_width": w, "edit_height": h, "composite": "none",
                                      "bg_changed_pixels": w * h}

    assert without["mask_over"] == "edit" and without["missing"] == {"source": "no source image"}
    assert decode_uri(without["images"]["mask"])[outside].min() >= 215  # over the white edit, as captioned


def test_gallery_without_a_browser(tmp_path):
    """What the page holds, checked in Python: a corrupt image in the manifest is named on its card."""
    table = make_manifest(tmp_path / "out", n_ok=3, n_error=0, n_skipped=0)
    rows = table.to_pylist()
    rows[1]["edited_png"] = b"\x89PNG not really"
    rows[2]["source_image"] = b"\xff\xd8 not a JPEG"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "one.parquet")
    page = write_gallery(tmp_path / "one.parquet", tmp_path / "one.html")
    data = json.loads(re.search(r'<script type="application/json" id="gallery-data">(.*?)</script>', page.read_text(), re.S).group(1))
    assert data["summary"]["rows"] == 3 and data["summary"]["by_status"] == {"ok": 3}
    assert "lpips" in data["summary"]["scores"] and "seed" not in data["summary"]["scores"]
    first, second, third = data["cards"]
    assert set(first["images"]) == {"source", "mask", "edit"} and first["mask_over"] == "source"
    assert "edit" not in second["images"] and "edited_png unreadable" in second["image_errors"][0]
    assert second["missing"] == {"edit": "edit image unreadable"} and second["mask_over"] == "source"
    # An unreadable source: a placeholder that says so, and the mask over the edit.
    assert third["missing"] == {"source": "source image unreadable"}
    assert "source_image unreadable" in third["image_errors"][0]
    assert set(third["images"]) == {"mask", "edit"} and third["mask_over"] == "edit"
    # limit keeps the page small for a large manifest, and still counts every row.
    page = write_gallery(tmp_path / "out", tmp_path / "limited.html", limit=1)
    data = json.loads(re.search(r'id="gallery-data">(.*?)</script>', page.read_text(), re.S).group(1))
    assert data["summary"]["rows"] == 3 and data["summary"]["shown"] == 1 and len(data["cards"]) == 1
    with pytest.raises(FileNotFoundError, match="No Parquet manifest"):
        write_gallery(tmp_path / "nothing-here")


def test_gallery_of_parts_with_and_without_source_images(tmp_path):
    """A folder of Parquet files of two schemas: the source column of the newer part is found and shown, the
    older part's rows say their manifest has none."""
    old = tmp_path / "old"
    make_manifest(old, n_ok=1, n_error=0, n_skipped=0, source=None)
    folder = tmp_path / "mixed"
    folder.mkdir()
    (old / "manifest" / "part-00001.parquet").rename(folder / "a.parquet")
    pq.write_table(schema.to_table(job_rows(n=1)), folder / "b.parquet")
    cards, summary = read_cards(manifest_files(folder))
    assert summary["has_source"] and [c["edit_id"] for c in cards] == ["edit-00", "e0", "e1"]
    assert cards[0]["missing"] == {"source": "no source image"} and cards[0]["mask_over"] == "edit"
    assert set(cards[1]["images"]) == {"source", "mask", "edit"} and cards[1]["mask_over"] == "source"
    assert cards[1]["details"]["composite"] == "mask" and cards[0]["details"]["composite"] is None


def test_gallery_of_the_job_schema_with_jpeg_edits(browser, tmp_path):
    """The job's own schema (manifests/schema.py): both edited_png and edited_jpg columns, the png one null."""
    rows = job_rows(n=3, seed=1)[:3]
    commit(tmp_path / "out", rows)
    page = write_gallery(tmp_path / "out")
    status, _ = page_status(browser, page, tmp_path / "profile", "#sort=clip_directional&desc=1")
    assert status["errors"] == [] and status["cards"] == 3
    assert status["images"] == 9 and status["decoded"] == 9
    assert status["order"] == ["e2", "e1", "e0"]
