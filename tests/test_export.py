"""`diffedit export` over a manifest built by hand (no model): exact integers, a safe --where, a --to that is
never mixed or clobbered, and shards a training script reads back with webdataset."""

import io
import json

import pytest
import webdataset as wds
from PIL import Image

import diffedit.manifests.export as export_module
from diffedit.manifests.export import export
from diffedit.manifests.schema import empty_row
from diffedit.manifests.store import OutputStore

BIG_SEEDS = (5712254869864443259, 5712254869864443258, 2**63 - 1)  # one float64 holds the first two alike


def png(color, size=(5, 3)):
    buf = io.BytesIO()
    Image.new("L", size, color).save(buf, "PNG")
    return buf.getvalue()


def ok_row(i, seed, **values):
    return empty_row(key=f"k/{i}", edit_id=f"edit{i:04d}", edit_index=0, sample_index=0, best=True, shard="s.tar",
                     source_prompt="a red dog", target_prompt=f"a blue dog {i}", status="ok", seed=seed, width=5,
                     height=3, mask_png=png(255), mask_fraction=0.5, edited_png=png(i), clip_target=0.1 * i,
                     **values)


def make_job(out, rows):
    store = OutputStore(out)
    store.begin(dict(seed=0))
    store.commit(rows)
    getattr(store, "close", lambda: None)()  # releases the job's lock where the store takes one


@pytest.fixture
def job(tmp_path):
    """Three ok rows with seeds a float64 cannot hold, and a skipped row whose null seed and sample index make
    pandas turn those columns into floats."""
    skipped = empty_row(key="k/skip", edit_id="skip", edit_index=0, shard="s.tar", status="skipped",
                        error="no caption")
    make_job(tmp_path / "out", [ok_row(i, seed) for i, seed in enumerate(BIG_SEEDS)] + [skipped])
    return tmp_path / "out"


def read_back(folder):
    """As a training script reads the shards: every edits-*.tar, decoded."""
    urls = sorted(str(p) for p in folder.glob("edits-*.tar"))
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "mask.png", "txt",
                                                                               "json")
    return {key: dict(png=edit, mask=mask, txt=txt, json=meta) for key, edit, mask, txt, meta in dataset}


def test_integers_are_exported_exactly(job, tmp_path):
    result = export(job, tmp_path / "wds")
    assert result["exported"] == 3
    samples = read_back(tmp_path / "wds")
    assert sorted(samples) == ["edit0000", "edit0001", "edit0002"]
    for i, seed in enumerate(BIG_SEEDS):
        meta = samples[f"edit{i:04d}"]["json"]
        assert meta["seed"] == seed and type(meta["seed"]) is int
        assert (meta["sample_index"], meta["width"], meta["height"]) == (0, 5, 3)
        assert all(type(meta[k]) is int for k in ("sample_index", "width", "height"))
        assert meta["key"] == f"k/{i}" and samples[f"edit{i:04d}"]["txt"] == f"a blue dog {i}"
        edit = samples[f"edit{i:04d}"]["png"]
        assert edit.size == (5, 3) and edit.getpixel((0, 0)) == (i, i, i)
    # The raw json text too: the exact digits, not 5712254869864442880.
    tar = next((tmp_path / "wds").glob("edits-*.tar")).read_bytes()
    assert b'"seed": 5712254869864443259' in tar and b"5712254869864442880" not in tar


def test_where_compares_int64_exactly(job, tmp_path):
    export(job, tmp_path / "one", where="seed == 5712254869864443259")
    assert [m["json"]["seed"] for m in read_back(tmp_path / "one").values()] == [5712254869864443259]
    export(job, tmp_path / "two", where="clip_target >= 0.1 and notnull(seed) and key != 'k/2'")
    assert sorted(read_back(tmp_path / "two")) == ["edit0001"]


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
    export(job, to, where="seed == 5712254869864443258")
    before = {p.name: p.read_bytes() for p in to.iterdir()}
    with pytest.raises(ValueError, match=f"--to {to} already holds an export.*--overwrite"):
        export(job, to)
    assert {p.name: p.read_bytes() for p in to.iterdir()} == before
    assert json.loads(before["export.json"])["exported"] == 1

    result = export(job, to, overwrite=True)
    assert result["exported"] == 3 and sorted(read_back(to)) == ["edit0000", "edit0001", "edit0002"]
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
    result = export(job, to, maxcount=2)
    assert result["exported"] == 3 and result["to"] == str(to)
    assert sorted(p.name for p in to.iterdir()) == ["edits-000000.tar", "edits-000001.tar", "export.json"]
    assert sorted(read_back(to)) == ["edit0000", "edit0001", "edit0002"]


def test_a_failed_export_leaves_the_previous_one_whole(job, tmp_path, monkeypatch):
    to = tmp_path / "wds"
    export(job, to, where="seed == 5712254869864443258")
    before = {p.name: p.read_bytes() for p in to.iterdir()}
    calls = []

    def fail_on_the_third_row(row):
        calls.append(row["edit_id"])
        if len(calls) == 3:
            raise OSError("disk full")
        return sample(row)

    sample = export_module._sample
    monkeypatch.setattr(export_module, "_sample", fail_on_the_third_row)
    with pytest.raises(OSError, match="disk full"):
        export(job, to, overwrite=True, maxcount=1)  # two shards written before the failure
    assert {p.name: p.read_bytes() for p in to.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "wds"]  # no temporary folder left
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        export(job, tmp_path / "new", maxcount=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "wds"]
