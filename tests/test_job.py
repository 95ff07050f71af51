"""The whole job on a real local Ray, real WebDataset tars and a tiny real model on CPU."""

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from diffedit.manifests.schema import SCHEMA_VERSION
from diffedit.manifests.store import OutputStore, ParameterMismatch, schema_version
from diffedit.pipelines.cli import main as cli_main
from diffedit.pipelines.config import JobConfig
from diffedit.pipelines.job import run_job

FAST = dict(steps=4, mask_samples=2)
RULES = "rules:\n  - from: red\n    to: [blue, green]\n"


def config(inputs, output, edit=(), **options) -> JobConfig:
    """A job's config from flat options, as the command line gives them (edit: flat edit parameters)."""
    return JobConfig.from_flat(inputs, output, **dict(edit), **options)



def png(image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def scene(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    w, h = int(rng.integers(20, 60)), int(rng.integers(20, 60))  # odd sizes on purpose
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards x 8 samples; 7 of 8 captions match the rule (2 edits each), 1 matches nothing."""
    folder = tmp_path_factory.mktemp("shards")
    sizes = {}
    for s in range(3):
        with wds.TarWriter(str(folder / f"data-{s:06d}.tar")) as sink:
            for i in range(8):
                key = f"s{s}-{i:02d}"
                image = scene(s * 10 + i)
                sizes[key] = image.size
                caption = "a red circle on a gray background" if i < 7 else "a green star"
                sink.write({"__key__": key, "png": png(image), "txt": caption})
    (folder / "rules.yaml").write_text(RULES)
    return {"pattern": str(folder / "data-{000000..000002}.tar"), "rules": str(folder / "rules.yaml"), "sizes": sizes}


def job(shards, out, **kw):
    options = dict(inputs=[shards["pattern"]], output=str(out), model=kw.pop("model"), prompts=shards["rules"],
                   edit=dict(FAST), batch_size=4)
    options.update(kw)
    return run_job(config(**options), log=lambda *a: None)


def read(out) -> pd.DataFrame:
    files = sorted((Path(out) / "manifest").glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)  # plain pandas, no diffedit


@pytest.fixture(scope="module")
def first(shards, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "job"
    summary = job(shards, out, model=str(tiny_model_dir))
    return out, summary


def test_end_to_end_rows_and_sizes(first, shards):
    out, summary = first
    df = read(out)
    assert len(df) == 3 * (7 * 2 + 1)
    assert summary["total_by_status"] == {"ok": 42, "skipped": 3}
    assert set(df[df.status == "ok"].target_prompt) == {"a blue circle on a gray background",
                                                          "a green circle on a gray background"}
    assert df.edit_id.is_unique and df.groupby("key").size().max() == 2
    skipped = df[df.status == "skipped"]
    assert set(skipped.key) == {"s0-07", "s1-07", "s2-07"} and (skipped.error == "no prompt rule matches").all()
    for row in df[df.status == "ok"].itertuples():
        size = shards["sizes"][row.key]
        assert Image.open(io.BytesIO(row.edited_png)).size == size
        mask = Image.open(io.BytesIO(row.mask_png))
        assert mask.size == size and mask.mode == "L"
        assert (row.width, row.height) == size and 0 <= row.mask_fraction <= 1
    part = next((Path(out) / "manifest").glob("part-*.parquet"))
    assert schema_version(part) == SCHEMA_VERSION
    run = OutputStore(out).read_run()
    assert run["completed"] and run["edit"]["steps"] == 4 and len(run["model_fingerprint"]) == 64


def assert_same_edits(a, b, same_status: bool = False) -> None:
    """Every row of ``b`` against the row of ``a`` with its edit_id (both indexed by it): for ok rows, the same mask
    and the edit within one 8-bit level; with ``same_status``, the same status for every row."""
    for eid, row in b.iterrows():
        if same_status:
            assert row.status == a.loc[eid].status
        if row.status != "ok":
            continue
        assert row.mask_png == a.loc[eid].mask_png
        x = np.asarray(Image.open(io.BytesIO(row.edited_png)), dtype=int)
        y = np.asarray(Image.open(io.BytesIO(a.loc[eid].edited_png)), dtype=int)
        assert np.abs(x - y).max() <= 1  # float rounding at an 8-bit boundary at most


def test_batch_size_does_not_change_results(first, shards, tiny_model_dir, tmp_path):
    out, _ = first
    other = tmp_path / "bs1"
    job(shards, other, model=str(tiny_model_dir), batch_size=1, limit=6)
    a = read(out).set_index("edit_id")
    b = read(other).set_index("edit_id")
    assert len(b) > 0
    assert_same_edits(a, b)


def test_two_calls_in_flight_give_the_same_rows(first, shards, tiny_model_dir, tmp_path):
    """The GPU setting (two EditActor calls at once per actor, in threads), run here on CPU: the same rows.
    Three shards are three blocks, so two tasks can be in the actor at once."""
    out, _ = first
    other = tmp_path / "threads"
    job(shards, other, model=str(tiny_model_dir), calls_in_flight=2)
    a = read(out).set_index("edit_id")
    b = read(other).set_index("edit_id")
    assert len(b) == len(a) and (b.status == "ok").sum() == 42
    assert_same_edits(a, b, same_status=True)


def test_rerun_skips_committed_rows_and_changed_parameters_are_refused(first, shards, tiny_model_dir):
    out, _ = first
    parts = {p: p.stat().st_mtime_ns for p in (Path(out) / "manifest").glob("part-*.parquet")}
    summary = job(shards, out, model=str(tiny_model_dir))
    assert summary["new_rows"] == 0 and summary["total_by_status"] == {"ok": 42, "skipped": 3}
    assert {p: p.stat().st_mtime_ns for p in (Path(out) / "manifest").glob("part-*.parquet")} == parts
    with pytest.raises(ParameterMismatch) as refused:  # only what changed is named
        job(shards, out, model=str(tiny_model_dir), edit=dict(FAST, steps=5), batch_size=2)
    assert f"(steps: {FAST['steps']} -> 5)" in str(refused.value)


def test_rerun_of_a_completed_glob_picks_up_new_shards(shards, tiny_model_dir, tmp_path):
    folder = tmp_path / "grow"
    folder.mkdir()
    for name in ("a", "b"):
        with wds.TarWriter(str(folder / f"{name}.tar")) as sink:
            sink.write({"__key__": f"{name}-0", "png": png(scene(1)), "txt": "a green star"})
    (folder / "b.tar").rename(folder / "b.later")
    glob_shards = dict(shards, pattern=str(folder / "*.tar"))
    assert job(glob_shards, tmp_path / "out", model=str(tiny_model_dir))["total_by_status"] == {"skipped": 1}
    (folder / "b.later").rename(folder / "b.tar")  # a new shard matches the same glob
    summary = job(glob_shards, tmp_path / "out", model=str(tiny_model_dir))
    assert summary["new_rows"] == 1 and summary["total_by_status"] == {"skipped": 2}


def test_status_and_export(first, tmp_path, capsys):
    out, _ = first
    assert cli_main(["status", str(out)]) == 0
    assert '"ok": 42' in capsys.readouterr().out
    assert cli_main(["export", str(out), "--to", str(tmp_path / "ex"), "--where", "mask_fraction >= 0"]) == 0
    samples = list(wds.WebDataset(str(tmp_path / "ex" / "edits-000000.tar"), shardshuffle=False))
    assert len(samples) == 42 and {"edited.png", "source.png", "mask.png", "json", "txt", "source.txt"} <= set(samples[0])
    assert cli_main(["export", str(out), "--to", str(tmp_path / "bad"), "--where", "nonsense >"]) == 2


def test_resume_after_sigkill(shards, tiny_model_dir, tmp_path, kill_part_way):
    """Kill the job's whole process group part-way; the rerun completes with exactly one row per edit,
    without recomputing what was committed."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "diffedit.pipelines.cli", "run", shards["pattern"], "--output", str(out),
           "--model", str(tiny_model_dir), "--prompts", shards["rules"], "--steps", "4", "--mask-samples", "2",
           "--batch-size", "2"]
    kill_part_way(cmd, out, parts=2)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "manifest").glob("part-*.parquet")}
    committed = len(read(out)) if before else 0
    assert 0 < committed < 45, f"{committed} rows committed before the kill: not part-way"
    summary = job(shards, out, model=str(tiny_model_dir))
    df = read(out)
    assert len(df) == 45 and df.edit_id.is_unique
    assert summary["new_rows"] == 45 - committed  # committed rows were not recomputed
    after = {p.name: p.stat().st_mtime_ns for p in (out / "manifest").glob("part-*.parquet")}
    assert all(after[name] == t for name, t in before.items())
    assert not list((out / "manifest").glob(".tmp-*"))


# -- bad inputs ------------------------------------------------------------------------------------


def bad_samples():
    good = scene(99)
    rgb = png(good)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    cmyk = io.BytesIO()
    good.convert("CMYK").save(cmyk, "JPEG")
    sixteen = Image.fromarray((np.random.default_rng(1).integers(0, 65535, (21, 17))).astype(np.uint16))
    huge = Image.new("L", (3000, 3000), 128)  # 9 MP, over the test's --max-pixels
    return [
        ("ok-rgb", {"png": rgb, "txt": "a red circle"}, "ok"),
        ("ok-L", {"png": png(good.convert("L")), "txt": "a red circle"}, "ok"),
        ("ok-LA", {"png": png(good.convert("LA")), "txt": "a red circle"}, "ok"),
        ("ok-P", {"png": png(good.convert("P")), "txt": "a red circle"}, "ok"),
        ("ok-RGBA", {"png": png(good.convert("RGBA")), "txt": "a red circle"}, "ok"),
        ("ok-CMYK", {"jpg": cmyk.getvalue(), "txt": "a red circle"}, "ok"),
        ("ok-I16", {"png": png(sixteen), "txt": "a red circle"}, "ok"),
        ("ok-exif", {"jpg": png(good.convert("RGB"), "JPEG", exif=exif), "txt": "a red circle"}, "ok"),
        ("ok-1x1", {"png": png(Image.new("RGB", (1, 1), (255, 0, 0))), "txt": "a red circle"}, "ok"),
        ("ok-json-caption", {"png": rgb, "json": b'{"caption": "a red circle"}'}, "ok"),
        ("weird/../key", {"png": rgb, "txt": "a red circle"}, "ok"),
        ("bad-corrupt", {"png": b"\x89PNG\r\n\x1a\nthis is not a png", "txt": "a red circle"}, "error"),
        ("bad-truncated", {"png": rgb[: len(rgb) // 2], "txt": "a red circle"}, "error"),
        ("bad-huge", {"png": png(huge), "txt": "a red circle"}, "error"),
        ("no-caption", {"png": rgb}, "skipped"),
        ("no-image", {"txt": "a red circle"}, "error"),
    ]


def test_bad_inputs_never_stop_the_job(tiny_model_dir, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    samples = bad_samples()
    with wds.TarWriter(str(folder / "mixed.tar")) as sink:
        for key, members, _ in samples:
            sink.write({"__key__": key, **members})
    (folder / "not-a-tar.tar").write_bytes(b"hello, I am text" * 100)
    (folder / "empty.tar").write_bytes(b"")
    good_tar = (folder / "mixed.tar").read_bytes()
    (folder / "truncated.tar").write_bytes(good_tar[: len(good_tar) // 3])
    (folder / "rules.yaml").write_text(RULES.replace("[blue, green]", "blue"))
    # A shard written by plain tarfile, with a user mask (left half) that replaces mask inference.
    user_mask = Image.new("L", (40, 24), 0)
    user_mask.paste(255, (0, 0, 20, 24))
    members = {"user-mask.jpg": png(scene(7).resize((40, 24)), "JPEG"), "user-mask.txt": b"a red circle",
               "user-mask.mask.png": png(user_mask)}
    with tarfile.open(folder / "plain.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    summary = run_job(config(inputs=[str(folder / "*.tar")], output=str(out), model=str(tiny_model_dir),
                                 prompts=str(folder / "rules.yaml"), edit=dict(FAST), batch_size=4,
                                 max_pixels=4_000_000), log=lambda *a: None)
    df = read(out)
    assert df.edit_id.is_unique  # truncated.tar holds the first samples of mixed.tar: same keys, other samples
    got = {r.key: (r.status, r.error) for r in df[df.shard.str.endswith("mixed.tar")].itertuples()}
    for key, _, expected in samples:
        assert got.get(key, ("missing",))[0] == expected, (key, got.get(key))
    shard_errors = {Path(r.shard).name: (r.status, r.error) for r in df[df.key.str.startswith("<shard")].itertuples()}
    for name in ("not-a-tar.tar", "empty.tar", "truncated.tar"):
        status, error = shard_errors[name]
        assert status == "error" and name in error
    assert "over the limit" in got["bad-huge"][1] and "decode" in got["bad-truncated"][1]
    assert len(df[(df.status == "ok") & ~df.shard.str.endswith("truncated.tar")]) == 12
    cut = df[df.shard.str.endswith("truncated.tar") & ~df.key.str.startswith("<shard")]
    assert len(cut) and set(cut.status) <= {"ok", "error"}  # the samples before the cut are kept
    user = df[df.key == "user-mask"].iloc[0]
    assert user.status == "ok" and not user.mask_inferred and user.shard.endswith("plain.tar")
    mask = np.asarray(Image.open(io.BytesIO(user.mask_png)))
    assert mask.shape == (24, 40) and mask[12, 0] == 255 and mask[12, 39] == 0 and 0.4 <= user.mask_fraction <= 0.6
    ok = df[df.status == "ok"].set_index("key")
    assert Image.open(io.BytesIO(ok.loc["ok-exif"].edited_png)).size == (scene(99).size[1], scene(99).size[0])
    assert Image.open(io.BytesIO(ok.loc["ok-1x1"].mask_png)).size == (1, 1)


def test_actor_calls_in_flight_share_the_model_one_batch_at_a_time(tiny_model_dir, tmp_path):
    """The job keeps two calls in flight per actor (threads): one batch's CPU work overlaps another's model work.
    The model still sees one batch at a time, and each call returns the rows it returns alone."""
    import threading
    import time

    import pyarrow as pa

    import pyarrow.parquet as pq

    from diffedit.manifests.store import OutputStore
    from diffedit.pipelines.actor import EditActor, ExpandOptions, expand_sample
    from diffedit.pipelines.config import CALLS_IN_FLIGHT, EngineConfig, OutputConfig, SamplingConfig
    from diffedit.pipelines.prompts import PromptSpec
    from diffedit.stages.config import EditConfig

    assert CALLS_IN_FLIGHT == 2
    store = OutputStore(tmp_path / "out")
    store.parts.mkdir(parents=True)
    actor = EditActor(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="fp32"), EditConfig.from_flat(FAST),
                      scores=None, output=OutputConfig(), sampling=SamplingConfig(), max_pixels=10**6,
                      output_dir=str(store.out))
    options = ExpandOptions(PromptSpec.from_dict({"rules": [{"from": "red", "to": "blue"}]}), "txt", SamplingConfig())

    def call(table: pa.Table) -> list[dict]:  # the rows of the part that one call staged
        (account,) = actor(table).to_pylist()
        return pq.read_table(store.parts / account["part"]).to_pylist()

    def batch(first: int) -> pa.Table:
        rows = []
        for i in range(first, first + 2):
            sample = dict(key=f"k{i}", shard="x.tar", image=png(scene(i)), caption="a red circle", label=None,
                          mask=None, error=None, json=None)  # a row of pipelines.actor.SAMPLE_SCHEMA
            rows += expand_sample(sample, options, frozenset())
        return pa.Table.from_pylist(rows)

    inside, most = [0], [0]
    predict = actor.model.predict

    def watched(*args, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            time.sleep(0.02)  # widen the window in which an unguarded second call would enter
            return predict(*args, **kwargs)
        finally:
            inside[0] -= 1

    actor.model.predict = watched
    alone = [call(batch(0)), call(batch(2))]
    together = [None, None]
    threads = [threading.Thread(target=lambda j=j: together.__setitem__(j, call(batch(2 * j))))
               for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    for a, b in zip(alone, together):
        assert [r["status"] for r in a] == [r["status"] for r in b] == ["ok", "ok"]
        assert [(r["edit_id"], r["edited_png"], r["mask_png"]) for r in a] == [(r["edit_id"], r["edited_png"], r["mask_png"]) for r in b]


def test_an_actor_pads_a_short_batch_for_a_compiled_model_without_changing_its_rows(tiny_model_dir, tmp_path):
    """With --compile the actor pads each edit size's short batch to the full batch shape (copies of its last row,
    results dropped), so a compiled model sees one shape per size; the rows it writes are those of the unpadded
    batch (to the engine's one level of float32 rounding)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffedit.manifests.store import OutputStore
    from diffedit.pipelines.actor import EditActor, ExpandOptions, expand_sample
    from diffedit.pipelines.config import EngineConfig, OutputConfig, SamplingConfig
    from diffedit.pipelines.prompts import PromptSpec
    from diffedit.stages.config import EditConfig

    store = OutputStore(tmp_path / "out")
    store.parts.mkdir(parents=True)
    options = ExpandOptions(PromptSpec.from_dict({"rules": [{"from": "red", "to": "blue"}]}), "txt", SamplingConfig())
    wide = scene(4).resize((96, 40))  # another edit size: padded on its own
    samples = [dict(key=f"k{i}", shard="x.tar", image=png(image), caption="a red circle", label=None, mask=None,
                    error=None, json=None) for i, image in enumerate([scene(3).resize((40, 40)), wide])]
    batch = pa.Table.from_pylist([r for s in samples for r in expand_sample(s, options, frozenset())])
    rows = []
    for pad_to in (None, 4):
        actor = EditActor(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="fp32"), EditConfig.from_flat(FAST),
                          scores=None, output=OutputConfig(), sampling=SamplingConfig(), max_pixels=10**6,
                          output_dir=str(store.out), pad_to=pad_to)
        (account,) = actor(batch).to_pylist()
        rows.append(pq.read_table(store.parts / account["part"]).to_pylist())
    assert [len(r) for r in rows] == [2, 2] and [r["status"] for r in rows[0]] == ["ok", "ok"]
    assert rows[0][0]["edit_width"] == rows[0][0]["edit_height"] and rows[0][1]["edit_width"] > rows[0][1]["edit_height"]
    # Exact but for the edit's pixels, which float32 sums in a batch-size-dependent order may move by one level
    # (as tests/test_engine.py: test_batch_invariance says).
    assert [{k for k in a if a[k] != b[k]} - {"edited_png"} for a, b in zip(*rows)] == [set(), set()]
    for a, b in zip(*rows):
        x, y = (np.asarray(Image.open(io.BytesIO(r["edited_png"]))).astype(int) for r in (a, b))
        assert np.abs(x - y).max() <= 1
