"""The HTML gallery, opened in a real headless browser (Debian's chromium).

The page writes a JSON summary of what it rendered (cards, images decoded, errors caught by window.onerror
and console.error) into ``#gallery-status``; ``chromium --dump-dom`` hands us the DOM after the page ran.
Skipped, with the reason, where chromium is not installed or cannot start.
"""

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

from diffedit.manifests.gallery import write_gallery

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
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def make_manifest(out_dir, n_ok=7, n_error=2, n_skipped=1, with_source=False, seed=0):
    """A manifest as DESIGN.md describes it, written with pyarrow alone, split over two Parquet files."""
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
        if with_source:
            row["source_png"] = png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        rows.append(row)
    schema = pa.schema(
        [("key", pa.string()), ("edit_id", pa.string()), ("shard", pa.string()), ("source_prompt", pa.string()),
         ("target_prompt", pa.string()), ("status", pa.string()), ("error", pa.string()), ("seed", pa.int64()),
         ("width", pa.int32()), ("height", pa.int32()), ("mask_png", pa.binary()), ("mask_fraction", pa.float32()),
         ("edited_png", pa.binary())]
        + [(c, pa.float32()) for c in ("clip_source", "clip_target", "clip_directional", "clip_image", "lpips")]
        + [("psnr_bg", pa.float64())]
        + ([("source_png", pa.binary())] if with_source else [])
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

    # Page 1 of all 10 rows: 4 cards, a mask overlay and an edit each, all decoded, no error.
    status, dom = page_status(browser, page, profile)
    assert status["errors"] == []
    assert (status["cards"], status["matching"], status["pages"], status["rows"]) == (4, 10, 3, 10)
    assert status["images"] == 8 and status["decoded"] == 8 and all(w > 0 for w in status["widths"])
    assert status["order"] == ["edit-00", "edit-01", "edit-02", "edit-03"]
    assert "<b>0</b>" not in dom  # an error message is text, never markup

    # The last page holds the rest; error and skipped rows have no images.
    status, _ = page_status(browser, page, profile, "#page=3")
    assert (status["cards"], status["images"]) == (2, 0)
    assert status["order"] == ["edit-08", "edit-09"]

    # Filter by status, sort by a score (descending, nulls last, inf first).
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    by_psnr = sorted(ok, key=lambda r: -r["psnr_bg"])
    status, _ = page_status(browser, page, profile, "#status=ok&sort=psnr_bg&desc=1")
    assert status["matching"] == 7 and status["order"] == [r["edit_id"] for r in by_psnr[:4]]
    assert status["order"][0] == "edit-05"  # the +inf PSNR
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


def test_gallery_with_source_column_and_a_broken_image(browser, tmp_path):
    make_manifest(tmp_path / "out", n_ok=3, n_error=0, n_skipped=0, with_source=True)
    page = write_gallery(tmp_path / "out" / "manifest", tmp_path / "g.html", page_size=50)
    status, _ = page_status(browser, page, tmp_path / "profile")
    assert status["errors"] == [] and status["cards"] == 3
    assert status["images"] == 9 and status["decoded"] == 9  # source, mask over source, edit

    # The check can fail: the same page with one image's bytes broken reports it.
    broken = tmp_path / "broken.html"
    text = page.read_text()
    start = text.index("data:image/jpeg;base64,") + len("data:image/jpeg;base64,")
    broken.write_text(text[:start] + "AAAA" + text[start + 4 :])
    status, _ = page_status(browser, broken, tmp_path / "profile")
    assert status["images"] == 9 and status["decoded"] == 8


def test_gallery_without_a_browser(tmp_path):
    """What the page holds, checked in Python: a corrupt image in the manifest is named on its card."""
    table = make_manifest(tmp_path / "out", n_ok=2, n_error=0, n_skipped=0)
    rows = table.to_pylist()
    rows[1]["edited_png"] = b"\x89PNG not really"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "one.parquet")
    page = write_gallery(tmp_path / "one.parquet", tmp_path / "one.html")
    data = json.loads(re.search(r'<script type="application/json" id="gallery-data">(.*?)</script>', page.read_text(), re.S).group(1))
    assert data["summary"]["rows"] == 2 and data["summary"]["by_status"] == {"ok": 2}
    assert "lpips" in data["summary"]["scores"] and "seed" not in data["summary"]["scores"]
    first, second = data["cards"]
    assert set(first["images"]) == {"mask", "edit"} and first["mask_over"] == "edit"
    assert "edit" not in second["images"] and "edited_png unreadable" in second["image_errors"][0]
    # limit keeps the page small for a large manifest, and still counts every row.
    page = write_gallery(tmp_path / "out", tmp_path / "limited.html", limit=1)
    data = json.loads(re.search(r'id="gallery-data">(.*?)</script>', page.read_text(), re.S).group(1))
    assert data["summary"]["rows"] == 2 and data["summary"]["shown"] == 1 and len(data["cards"]) == 1
    with pytest.raises(FileNotFoundError, match="No Parquet manifest"):
        write_gallery(tmp_path / "nothing-here")


def test_gallery_of_the_job_schema_with_jpeg_edits(browser, tmp_path):
    """The job's own schema (manifests/schema.py): both edited_png and edited_jpg columns, the png one null."""
    schema = pytest.importorskip("diffedit.manifests.schema")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        mask = np.zeros((64, 64), np.uint8)
        mask[10:40, 10:40] = 255
        rows.append(schema.empty_row(
            key=f"k{i}", edit_id=f"e{i}", edit_index=0, source_prompt="a red circle", target_prompt="a blue circle",
            status="ok", seed=i, width=64, height=64, mask_png=png(mask), mask_fraction=0.22,
            edited_jpg=buf.getvalue(), clip_directional=0.1 * i, ssim_bg=0.9,
        ))
    folder = tmp_path / "out" / "manifest"
    folder.mkdir(parents=True)
    pq.write_table(schema.to_table(rows), folder / "part-00000.parquet")
    page = write_gallery(tmp_path / "out")
    status, _ = page_status(browser, page, tmp_path / "profile", "#sort=clip_directional&desc=1")
    assert status["errors"] == [] and status["cards"] == 3
    assert status["images"] == 6 and status["decoded"] == 6
    assert status["order"] == ["e2", "e1", "e0"]
