"""`diffedit export` over a manifest built by hand (no model): training pairs (source, edit, mask, prompts, json)
as WebDataset shards and as Parquet, read back by plain webdataset and pandas; exact integers; streaming; a safe
--where; a --to that is never mixed or clobbered."""

import io
import json
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

import diffedit.manifests.export as export_module
from diffedit.manifests.export import export
from diffedit.manifests.schema import empty_row, to_table
from diffedit.manifests.store import OutputStore
from diffedit.pipelines.cli import main as cli_main

BIG_SEEDS = (5712254869864443259, 5712254869864443258, 2**63 - 1)  # one float64 holds the first two alike
SIZE = (5, 3)
FORMATS = {0: "JPEG", 1: "PNG", 2: "WEBP"}  # the source image's format, by row
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
RUN = dict(edit=dict(steps=50, guidance=7.5, threshold=0.75, composite="mask"), engine=dict(model=None),
           sampling=dict(seed=0, samples_per_edit=1, best_by="clip_directional"), model="/models/shapes-ldm",
           model_fingerprint="f" * 64, schema_version="4")


def image(color, fmt="PNG", mode="L", size=SIZE):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def ok_row(i, seed, **values):
    fmt = FORMATS[i % 3]
    row = dict(key=f"k/{i}", edit_id=f"edit{i:04d}", edit_index=0, sample_index=0, best=True, shard="/data/s.tar",
               source_prompt=f"a red dog {i}", target_prompt=f"a blue dog {i}", status="ok", seed=seed, width=5,
               height=3, edit_width=64, edit_height=32, composite="mask", feather=6, bg_changed_pixels=0,
               input_json=json.dumps({"url": f"http://x/{i}.jpg", "similarity": 0.25 * i}),
               source_image=image((200, 10, 10), fmt, "RGB"), mask_png=image(255), mask_inferred=True,
               mask_fraction=0.5, edited_png=image(i), clip_target=0.1 * i, psnr_bg=math.inf)
    return empty_row(**{**row, **values})


def make_job(out, rows, run=RUN):
    store = OutputStore(out)
    store.begin(run)
    store.commit(rows)
    store.close()


@pytest.fixture
def job(tmp_path):
    """Three ok rows with seeds a float64 cannot hold, and a skipped row whose null seed and sample index make
    pandas turn those columns into floats."""
    skipped = empty_row(key="k/skip", edit_id="skip", edit_index=0, shard="/data/s.tar", status="skipped",
                        error="no caption")
    make_job(tmp_path / "out", [ok_row(i, seed) for i, seed in enumerate(BIG_SEEDS)] + [skipped])
    return tmp_path / "out"


def read_back(folder):
    """As a training script reads the shards: plain webdataset over a brace pattern of every edits-*.tar."""
    names = sorted(p.name for p in folder.glob("edits-*.tar"))
    url = f"{folder}/edits-{{{names[0][6:12]}..{names[-1][6:12]}}}.tar"
    return {s["__key__"]: s for s in wds.WebDataset(url, shardshuffle=False).decode("pil")}


def read_pairs(folder):
    """As a training script reads the Parquet export with pandas: every pairs-*.parquet (not export.json)."""
    return pd.read_parquet(sorted(str(p) for p in folder.glob("pairs-*.parquet")))


def manifest_seeds(out):
    """The seeds as pyarrow reads them from the manifest: exact int64, by edit_id."""
    table = pq.read_table(out / "manifest", columns=["edit_id", "seed"])
    return dict(zip(table.column("edit_id").to_pylist(), table.column("seed").to_pylist()))


def test_webdataset_pairs_read_back_with_plain_webdataset(job, tmp_path):
    result = export(job, tmp_path / "wds", max_pairs=2)
    assert result == dict(exported=3, without_source=0, to=str(tmp_path / "wds"), format="webdataset", where=None,
                          best_only=False)
    samples = read_back(tmp_path / "wds")
    assert sorted(samples) == ["edit0000", "edit0001", "edit0002"]
    for i in range(3):
        s = samples[f"edit{i:04d}"]
        source = f"source.{EXTENSIONS[FORMATS[i]]}"
        assert set(s) - {"__key__", "__url__", "__local_path__"} == {source, "edited.png", "mask.png", "txt",
                                                                     "source.txt", "json"}
        assert all(isinstance(s[k], Image.Image) and s[k].size == SIZE for k in (source, "edited.png", "mask.png"))
        assert s[source].getpixel((0, 0))[0] > 150 and s["edited.png"].getpixel((0, 0)) == (i, i, i)
        assert (s["txt"], s["source.txt"]) == (f"a blue dog {i}", f"a red dog {i}")
        meta = s["json"]
        assert meta["seed"] == manifest_seeds(job)[f"edit{i:04d}"] == BIG_SEEDS[i] and type(meta["seed"]) is int
        assert (meta["key"], meta["edit_id"], meta["sample_index"], meta["best"]) == (f"k/{i}", f"edit{i:04d}", 0, True)
        assert (meta["width"], meta["height"], meta["edit_width"], meta["edit_height"]) == (5, 3, 64, 32)
        assert (meta["composite"], meta["feather"], meta["bg_changed_pixels"], meta["mask_inferred"]) == ("mask", 6, 0, True)
        assert meta["shard_uri"] == "file:///data/s.tar"
        assert meta["input"] == {"url": f"http://x/{i}.jpg", "similarity": 0.25 * i}
        assert meta["run"] == dict(model="/models/shapes-ldm", model_fingerprint="f" * 64, edit=RUN["edit"],
                                   sampling=RUN["sampling"], schema_version="4")
        assert meta["scores"]["clip_target"] == pytest.approx(0.1 * i) and meta["scores"]["lpips"] is None
        assert meta["scores"]["psnr_bg"] is None and meta["infinite_scores"] == {"psnr_bg": "+inf"}
    # The raw json text: the exact digits, not 5712254869864442880, and strict JSON (no NaN, no Infinity).
    tars = b"".join(p.read_bytes() for p in (tmp_path / "wds").glob("edits-*.tar"))
    assert b'"seed": 5712254869864443259' in tars and b"5712254869864442880" not in tars
    assert b"Infinity" not in tars and b"NaN" not in tars


def test_the_manifest_reads_with_plain_pandas(job):
    """No options: exact seeds and integer sizes (nullable Int dtypes), though the skipped row's are null."""
    df = pd.read_parquet(job / "manifest").set_index("edit_id")
    assert str(df.seed.dtype) == "Int64" and str(df.width.dtype) == "Int32" and str(df.edit_width.dtype) == "Int32"
    assert [df.seed[f"edit{i:04d}"] for i in range(3)] == list(BIG_SEEDS)
    assert pd.isna(df.seed["skip"]) and pd.isna(df.width["skip"])
    assert (df.width["edit0000"], df.height["edit0000"]) == (5, 3)


def test_parquet_pairs_read_back_with_pandas(job, tmp_path):
    result = export(job, tmp_path / "pq", format="parquet")
    assert (result["exported"], result["format"]) == (3, "parquet")
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == ["export.json", "pairs-00000.parquet"]
    df = pd.read_parquet(tmp_path / "pq" / "pairs-00000.parquet")
    assert list(df.columns[:5]) == ["input_image", "edit_prompt", "edited_image", "source_prompt", "mask"]
    assert {"key", "edit_id", "shard_uri", "seed", "sample_index", "best", "width", "height", "edit_width",
            "composite", "feather", "bg_changed_pixels", "clip_target", "psnr_bg", "input_json"} <= set(df.columns)
    assert df.seed.dtype == np.int64 and list(df.seed) == list(BIG_SEEDS)
    assert list(df.edit_prompt) == [f"a blue dog {i}" for i in range(3)] and df.shard_uri[0] == "file:///data/s.tar"
    for i, row in df.iterrows():
        source, edited, mask = (Image.open(io.BytesIO(row[c]["bytes"]))
                                for c in ("input_image", "edited_image", "mask"))
        assert source.format == FORMATS[i] and source.size == edited.size == mask.size == SIZE
        assert edited.getpixel((0, 0)) == i and json.loads(row.input_json)["url"] == f"http://x/{i}.jpg"
    assert math.isinf(df.psnr_bg[0])  # Parquet keeps the float as it is
    schema = pq.read_schema(tmp_path / "pq" / "pairs-00000.parquet")
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["input_image"] == features["edited_image"] == features["mask"] == {"_type": "Image"}
    assert features["seed"] == {"dtype": "int64", "_type": "Value"}
    assert features["clip_target"] == {"dtype": "float32", "_type": "Value"}
    assert json.loads(schema.metadata[b"diffedit.run"])["model_fingerprint"] == "f" * 64
    assert json.loads((tmp_path / "pq" / "export.json").read_text())["layout"]["columns"][:3] == [
        "input_image", "edit_prompt", "edited_image"]


def test_parquet_pairs_load_with_hugging_face_datasets(job, tmp_path):
    datasets = pytest.importorskip("datasets")
    export(job, tmp_path / "pq", format="parquet")
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "pq" / "pairs-*.parquet"), split="train")
    row = ds[0]
    assert isinstance(row["input_image"], Image.Image) and isinstance(row["edited_image"], Image.Image)
    assert row["edit_prompt"] == "a blue dog 0" and row["seed"] == BIG_SEEDS[0]


def test_parquet_files_and_row_groups_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "ROW_GROUP_ROWS", 4)
    make_job(tmp_path / "out", [ok_row(i, i) for i in range(0, 8)])
    make_job(tmp_path / "out", [ok_row(i, i) for i in range(8, 23)])  # a second part
    export(tmp_path / "out", tmp_path / "pq", format="parquet", max_pairs=10)
    files = sorted((tmp_path / "pq").glob("pairs-*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [10, 10, 3]
    assert all(pq.ParquetFile(f).metadata.row_group(g).num_rows <= 4 for f in files
               for g in range(pq.ParquetFile(f).num_row_groups))
    assert sorted(read_pairs(tmp_path / "pq").seed) == list(range(23))


def test_export_streams_and_reads_images_only_of_kept_row_groups(tmp_path, monkeypatch):
    """Never the whole manifest at once; row groups without a kept row are read for their filter columns only."""
    make_job(tmp_path / "out", [ok_row(i, i, clip_target=0.0) for i in range(5)])
    make_job(tmp_path / "out", [ok_row(i, i) for i in range(5, 9)])
    monkeypatch.setattr(OutputStore, "read", lambda *a, **k: pytest.fail("export read the whole manifest"))
    read = []
    batches = export_module._batches

    def recording(pf, group, names):
        read.append(set(names))
        return batches(pf, group, names)

    monkeypatch.setattr(export_module, "_batches", recording)
    for fmt in ("webdataset", "parquet"):
        read.clear()
        assert export(tmp_path / "out", tmp_path / fmt, where="clip_target > 0.3", format=fmt)["exported"] == 4
        assert sum("source_image" in names for names in read) == 1 and len(read) == 3


def test_where_compares_int64_exactly(job, tmp_path):
    export(job, tmp_path / "one", where="seed == 5712254869864443259")
    assert [s["json"]["seed"] for s in read_back(tmp_path / "one").values()] == [5712254869864443259]
    export(job, tmp_path / "two", where="clip_target >= 0.1 and notnull(seed) and key != 'k/2'")
    assert sorted(read_back(tmp_path / "two")) == ["edit0001"]
    export(job, tmp_path / "three", where="seed == 5712254869864443258", format="parquet")
    assert list(read_pairs(tmp_path / "three").seed) == [5712254869864443258]


def test_best_only_in_both_formats(tmp_path):
    rows = [ok_row(i, i, edit_id=f"e{i}", sample_index=i % 2, best=i % 2 == 1) for i in range(4)]
    make_job(tmp_path / "out", rows + [empty_row(key="x", edit_id="err", status="error", error="boom")])
    assert sorted(read_back_wds(tmp_path / "out", tmp_path / "w", best_only=True)) == ["e1", "e3"]
    export(tmp_path / "out", tmp_path / "p", format="parquet", best_only=True, where="seed > 1")
    assert list(read_pairs(tmp_path / "p").edit_id) == ["e3"]


def read_back_wds(out, to, **options):
    export(out, to, **options)
    return read_back(to)


def test_rows_without_a_source_are_exported_without_one_and_counted(tmp_path):
    """Rows of an older manifest: a part without the schema 4 columns at all, and a row whose source is null."""
    make_job(tmp_path / "out", [ok_row(0, 1), ok_row(1, 2, source_image=None, input_json=None)])
    old = to_table([ok_row(2, 3)]).drop_columns(["source_image", "input_json", "edit_width", "edit_height",
                                                 "composite", "bg_changed_pixels"])
    pq.write_table(old, tmp_path / "out" / "manifest" / "part-old.parquet")
    result = export(tmp_path / "out", tmp_path / "wds")
    assert (result["exported"], result["without_source"]) == (3, 2)
    assert json.loads((tmp_path / "wds" / "export.json").read_text())["without_source"] == 2
    samples = read_back(tmp_path / "wds")
    assert "source.jpg" in samples["edit0000"] and not any(k.startswith("source.") and k != "source.txt"
                                                           for k in samples["edit0001"])
    assert samples["edit0002"]["json"]["input"] is None and samples["edit0002"]["json"]["edit_width"] is None
    assert samples["edit0002"]["edited.png"].size == SIZE
    export(tmp_path / "out", tmp_path / "pq", format="parquet")
    df = read_pairs(tmp_path / "pq").set_index("edit_id")
    assert df.input_image["edit0000"] is not None and df.input_image[["edit0001", "edit0002"]].isna().all()
    only = export(tmp_path / "out", tmp_path / "only", where="source_image is not null")
    assert (only["exported"], only["without_source"]) == (1, 0)


def test_json_is_strict_whatever_the_input_json_holds(tmp_path):
    """Python's json reads NaN and Infinity in a sample's json member; the export's json never holds them."""
    make_job(tmp_path / "out", [ok_row(0, 1, input_json='{"similarity": NaN, "n": [Infinity, 1]}',
                                       clip_image=float("nan"), psnr_fg=-math.inf)])
    meta = read_back_wds(tmp_path / "out", tmp_path / "wds")["edit0000"]["json"]
    assert meta["input"] == {"similarity": None, "n": [None, 1]}
    assert meta["scores"]["clip_image"] is None and meta["infinite_scores"] == {"psnr_bg": "+inf", "psnr_fg": "-inf"}


def test_the_command_line(job, tmp_path, capsys):
    assert cli_main(["export", str(job), "--to", str(tmp_path / "pq"), "--format", "parquet", "--per-file", "2",
                     "--where", "seed > 0"]) == 0
    assert json.loads(capsys.readouterr().out)["exported"] == 3
    assert sorted(p.name for p in (tmp_path / "pq").glob("*.parquet")) == ["pairs-00000.parquet", "pairs-00001.parquet"]
    assert cli_main(["export", str(job), "--to", str(tmp_path / "pq"), "--overwrite", "--max-mb", "0.001"]) == 0
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == ["edits-000000.tar", "edits-000001.tar",
                                                                  "edits-000002.tar", "export.json"]


@pytest.mark.parametrize("where", ["seed > 0 and @pd.io.common.os.system('touch {target}') == 0",
                                   "__import__('os').system('touch {target}') == 0", "1", "no_such_column > 1"])
def test_a_bad_where_is_one_line_on_the_command_line(job, tmp_path, capsys, where):
    target = tmp_path / "pwned.txt"
    assert cli_main(["export", str(job), "--to", str(tmp_path / "wds"), "--where", where.format(target=target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffedit export: error: --where is not a valid filter") and err.count("\n") == 1
    assert "Traceback" not in err and not target.exists() and not (tmp_path / "wds").exists()


def test_bad_options_are_refused_before_anything_is_read(job, tmp_path):
    with pytest.raises(ValueError, match="--format 'csv': the formats are webdataset, parquet"):
        export(job, tmp_path / "x", format="csv")
    with pytest.raises(ValueError, match="--per-file must be >= 1"):
        export(job, tmp_path / "x", max_pairs=0)
    assert not (tmp_path / "x").exists()


def test_a_hostile_where_runs_nothing_and_writes_nothing(job, tmp_path):
    target = tmp_path / "pwned.txt"
    for where in [f"@pd.io.common.os.system('touch {target}')",
                  f"seed > 0 and @pd.io.common.os.system('touch {target}') == 0",
                  f"__import__('os').system('touch {target}') == 0",
                  "key.__class__.__mro__[1].__subclasses__()"]:
        with pytest.raises(Exception) as info:
            export(job, tmp_path / "wds", where=where)
        assert not target.exists(), f"--where {where!r} ran a shell command"
        assert isinstance(info.value, ValueError) and "--where is not a valid filter" in str(info.value)
    assert not (tmp_path / "wds").exists()


def test_a_where_that_is_no_boolean_is_a_clear_error(job, tmp_path):
    with pytest.raises(ValueError, match="a filter must be a boolean expression"):
        export(job, tmp_path / "wds", where="1")
    with pytest.raises(ValueError, match="empty"):  # an empty variable in a script: not "export everything"
        export(job, tmp_path / "wds", where="")
    with pytest.raises(ValueError, match="unknown column 'no_such_column'; the columns are: key, edit_id"):
        export(job, tmp_path / "wds", where="no_such_column > 1")
    assert not (tmp_path / "wds").exists()


def test_a_folder_without_a_job_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(FileNotFoundError, match="holds no diffedit job"):
            export(folder, tmp_path / "wds")
    assert not (tmp_path / "wds").exists() and not (tmp_path / "missing").exists()


def test_a_non_empty_to_is_refused_unless_overwrite(job, tmp_path):
    to = tmp_path / "wds"
    to.mkdir()  # an empty folder is used
    export(job, to, where="seed == 5712254869864443258", format="parquet")
    before = {p.name: p.read_bytes() for p in to.iterdir()}
    with pytest.raises(ValueError, match=f"--to {to} already holds an export.*--overwrite"):
        export(job, to)
    assert {p.name: p.read_bytes() for p in to.iterdir()} == before
    assert json.loads(before["export.json"])["exported"] == 1

    result = export(job, to, overwrite=True)  # a parquet export replaced by shards: nothing of it is left
    assert result["exported"] == 3 and sorted(read_back(to)) == ["edit0000", "edit0001", "edit0002"]
    assert sorted(p.name for p in to.iterdir()) == ["edits-000000.tar", "export.json"]
    assert json.loads((to / "export.json").read_text())["exported"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".wds.")]  # no temporary folder left


def test_overwrite_never_removes_other_files(job, tmp_path):
    to = tmp_path / "wds"
    export(job, to)
    (to / "notes.txt").write_text("mine")
    shards = sorted(p.name for p in to.glob("edits-*.tar"))
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=f"--to {to} holds files that no diffedit export wrote \\(notes.txt\\)"):
            export(job, to, overwrite=overwrite)
    assert (to / "notes.txt").read_text() == "mine" and sorted(p.name for p in to.glob("edits-*.tar")) == shards
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        export(job, tmp_path / "file", overwrite=True)


def test_percent_in_to(job, tmp_path):
    to = tmp_path / "run %d 100%" / "%s%%"
    result = export(job, to, max_pairs=2)
    assert result["exported"] == 3 and result["to"] == str(to)
    assert sorted(p.name for p in to.iterdir()) == ["edits-000000.tar", "edits-000001.tar", "export.json"]
    assert sorted(read_back(to)) == ["edit0000", "edit0001", "edit0002"]


@pytest.mark.parametrize("fmt, writer", [("webdataset", "_sample"), ("parquet", "_pairs")])
def test_a_failed_export_leaves_the_previous_one_whole(job, tmp_path, monkeypatch, fmt, writer):
    to = tmp_path / "wds"
    export(job, to, where="seed == 5712254869864443258")
    before = {p.name: p.read_bytes() for p in to.iterdir()}
    calls = []
    original = getattr(export_module, writer)

    def fail_on_the_third_call(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(*args)

    monkeypatch.setattr(export_module, writer, fail_on_the_third_call)
    monkeypatch.setattr(export_module, "READ_ROWS", 1)  # parquet: one row a batch, and a row group each
    monkeypatch.setattr(export_module, "ROW_GROUP_ROWS", 1)
    with pytest.raises(OSError, match="disk full"):
        export(job, to, overwrite=True, max_pairs=1, format=fmt)  # two files written before the failure
    assert {p.name: p.read_bytes() for p in to.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "wds"]  # no temporary folder left
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        export(job, tmp_path / "new", max_pairs=1, format=fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "wds"]


def test_the_readme_snippets(job, tmp_path, monkeypatch):
    """What README's export section shows a training script doing, as it shows it."""
    import glob

    monkeypatch.chdir(tmp_path)
    export(job, "pairs", max_pairs=2)
    ds = (wds.WebDataset("pairs/edits-{000000..000001}.tar", shardshuffle=False).decode("pil")
          .to_tuple("source.jpg;source.png;source.webp", "edited.png;edited.jpg", "mask.png", "txt", "json"))
    got = [(source.size, edited.size, mask.size, prompt, meta["seed"]) for source, edited, mask, prompt, meta in ds]
    assert got == [(SIZE, SIZE, SIZE, f"a blue dog {i}", BIG_SEEDS[i]) for i in range(3)]

    export(job, "pairs-pq", format="parquet")
    df = pd.read_parquet(sorted(glob.glob("pairs-pq/pairs-*.parquet")))
    row = df.iloc[0]
    source = Image.open(io.BytesIO(row.input_image["bytes"]))
    edited = Image.open(io.BytesIO(row.edited_image["bytes"]))
    assert (source.size, edited.size, row.edit_prompt, row.seed) == (SIZE, SIZE, "a blue dog 0", BIG_SEEDS[0])
    assert json.loads(row.input_json)["url"] == "http://x/0.jpg"
