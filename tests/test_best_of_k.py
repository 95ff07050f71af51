"""Best-of-k (`--samples-per-edit K`, `--best-by`): a small real job (real local Ray, WebDataset tars, the tiny
model on CPU), its `best` column checked against the rows themselves with plain pandas, resume, export."""

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from diffedit.manifests.best import BETTER, check_best_by, mark_best
from diffedit.manifests.schema import SCHEMA_VERSION, SCORE_COLUMNS
from diffedit.manifests.store import OutputStore, ParameterMismatch, schema_version
from diffedit.pipelines.cli import main as cli_main
from diffedit.pipelines.config import JobConfig
from diffedit.pipelines.job import run_job

FAST = dict(steps=4, mask_samples=2)
RULES = "rules:\n  - from: red\n    to: [blue, green]\n"
K = 3
GROUP = ["key", "edit_index"]


def config(inputs, output, edit=(), **options) -> JobConfig:
    """A job's config from flat options, as the command line gives them (edit: flat edit parameters)."""
    return JobConfig.from_flat(inputs, output, **dict(edit), **options)



def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def write_shard(path, n, seed):
    """n samples; all but the last caption match the rule (2 edits each); images >= 32 px for LPIPS."""
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            w, h = int(rng.integers(32, 56)), int(rng.integers(32, 56))
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            caption = "a red circle on a gray background" if i < n - 1 else "a green star"
            sink.write({"__key__": f"{path.stem}-{i:02d}", "png": png(image), "txt": caption})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_shard(folder / "small.tar", 4, seed=0)  # 3 x 2 edits, 1 skipped
    (folder / "rules.yaml").write_text(RULES)
    return dict(folder=folder, small=str(folder / "small.tar"), rules=str(folder / "rules.yaml"))


def job(shards, out, model, **kw):
    options = dict(inputs=[shards["small"]], output=str(out), model=str(model), prompts=shards["rules"],
                   edit=dict(FAST), batch_size=2)
    options.update(kw)
    return run_job(config(**options), log=lambda *a: None)


def read(out) -> pd.DataFrame:
    files = sorted((Path(out) / "manifest").glob("part-*.parquet"))
    # Plain pandas, no diffedit; nullable dtypes keep the 63-bit seeds exact (float64 would round them).
    return pd.concat([pd.read_parquet(f, dtype_backend="numpy_nullable") for f in files], ignore_index=True)


def parts(out):
    return {p.name: p.stat().st_mtime_ns for p in (Path(out) / "manifest").glob("part-*.parquet")}


def assert_whole_groups(out, k):
    """Every committed part holds whole edits: all k samples of an edit, or none of them."""
    for f in (Path(out) / "manifest").glob("part-*.parquet"):
        edits = pd.read_parquet(f, columns=[*GROUP, "sample_index"]).dropna(subset=["sample_index"])
        sizes = edits.groupby(GROUP).sample_index.agg(["size", "nunique"])
        assert (sizes["size"] == k).all() and (sizes["nunique"] == k).all(), (f.name, sizes)


@pytest.fixture(scope="module")
def k3(shards, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("k3") / "job"
    summary = job(shards, out, tiny_model_dir, samples_per_edit=K)
    return out, summary


# -- the real job ----------------------------------------------------------------------------------------


def test_k_samples_per_edit_and_exactly_one_best(k3):
    out, summary = k3
    df = read(out)
    assert summary["total_by_status"] == {"ok": 3 * 2 * K, "skipped": 1}
    assert summary["new_edits_best_without_score"] == 0
    assert df.edit_id.is_unique and df.seed.dropna().is_unique
    edits = df[df.status == "ok"]
    assert edits.groupby(GROUP).sample_index.apply(lambda s: sorted(s.astype(int)) == [0, 1, 2]).all()
    assert edits.groupby(GROUP).best.sum().eq(1).all()
    # best == the argmax of clip_directional within each edit, computed here from the rows themselves.
    assert edits.clip_directional.notna().all()
    expected = edits.loc[edits.groupby(GROUP).clip_directional.idxmax(), "edit_id"]
    assert set(expected) == set(edits[edits.best].edit_id)
    skipped = df[df.status == "skipped"].iloc[0]
    assert not skipped.best and pd.isna(skipped.sample_index)
    assert_whole_groups(out, K)
    assert schema_version(next((Path(out) / "manifest").glob("part-*.parquet"))) == SCHEMA_VERSION
    run = OutputStore(out).read_run()
    assert (run["sampling"]["samples_per_edit"], run["sampling"]["best_by"]) == (K, "clip_directional")
    assert "higher clip_directional is better" in run["best_rule"] and "sample 0" in run["best_rule"]


def test_one_sample_per_edit_has_the_documented_ids_and_seeds_and_sample_0s_edit(k3, shards, tiny_model_dir, tmp_path):
    out3, _ = k3
    out1 = tmp_path / "k1"
    job(shards, out1, tiny_model_dir)
    one = read(out1)
    ok = one[one.status == "ok"]
    assert len(ok) == 6 and ok.best.all() and (ok.sample_index == 0).all()
    for row in ok.itertuples():  # the formulas of schema version 3, written out here independently
        text = "\x1f".join([row.shard, row.key, str(row.edit_index), row.source_prompt, row.target_prompt])
        assert row.edit_id == hashlib.sha1(text.encode()).hexdigest()[:20]
        digest = hashlib.blake2b(f"0\x1f{row.shard}\x1f{row.key}\x1f{row.edit_index}".encode(), digest_size=8).digest()
        assert row.seed == int.from_bytes(digest, "little") & (2**63 - 1)
    # Sample 0 of the k = 3 job is the same edit as the k = 1 job's: same seed, same mask, same image.
    three = read(out3)
    first = three[three.sample_index == 0].set_index(GROUP)
    for row in ok.itertuples():
        other = first.loc[(row.key, row.edit_index)]
        assert other.seed == row.seed and other.edit_id != row.edit_id and other.mask_png == row.mask_png
        x, y = (np.asarray(Image.open(io.BytesIO(b)), dtype=int) for b in (row.edited_png, other.edited_png))
        assert np.abs(x - y).max() <= 1


def test_changed_k_or_score_is_refused(k3, shards, tiny_model_dir):
    out, _ = k3
    before = parts(out)
    with pytest.raises(ParameterMismatch, match="samples_per_edit: 3 -> 2"):
        job(shards, out, tiny_model_dir, samples_per_edit=2)
    with pytest.raises(ParameterMismatch, match="best_by: 'clip_directional' -> 'clip_image'"):
        job(shards, out, tiny_model_dir, samples_per_edit=K, best_by="clip_image")
    assert parts(out) == before
    with pytest.raises(ValueError, match="--best-by"):
        job(shards, out, tiny_model_dir, samples_per_edit=K, best_by="mask_fraction")
    with pytest.raises(ValueError, match="null .*--no-scores"):
        job(shards, out, tiny_model_dir, samples_per_edit=K, scores=False)
    assert job(shards, out, tiny_model_dir, samples_per_edit=K)["new_rows"] == 0


def test_status_export_best_only_and_where(k3, tmp_path, capsys):
    out, _ = k3
    df = read(out)
    assert cli_main(["status", str(out)]) == 0
    best = json.loads(capsys.readouterr().out)["best_of_k"]
    assert best == dict(samples_per_edit=K, best_by="clip_directional", edits=6, edits_with_an_ok_sample=6,
                        best_rows=6, edits_best_without_score=0)

    def exported(*args):
        to = tmp_path / f"ex{len(list(tmp_path.iterdir()))}"
        assert cli_main(["export", str(out), "--to", str(to), *args]) == 0
        capsys.readouterr()
        return [json.loads(s["json"]) for s in wds.WebDataset(str(to / "edits-000000.tar"), shardshuffle=False)]

    assert len(exported()) == 6 * K  # without --best-only: every ok sample
    metas = exported("--best-only")
    assert len(metas) == df[df.status == "ok"].groupby(GROUP).ngroups == 6
    assert {m["edit_id"] for m in metas} == set(df[df.best].edit_id) and all(m["best"] for m in metas)
    threshold = float(sorted(df[df.best].clip_image)[3])  # from the data: keeps some best rows, drops others
    where = f"best and clip_image >= {threshold!r}"
    want = df[df.best & (df.clip_image >= threshold)]
    assert 0 < len(want) < 6, "the threshold should keep some best rows and drop others"
    assert {m["edit_id"] for m in exported("--where", where)} == set(want.edit_id)
    # never empty, whichever rows are best (near-tied scores can make every edit's best the same sample_index):
    # each edit has two rows that are not best, and at most one of them is sample 0
    not_best = df[~df.best & (df.sample_index >= 1)]
    assert len(not_best) >= 6
    assert {m["edit_id"] for m in exported("--where", "not best and sample_index >= 1")} == set(not_best.edit_id)


def test_resume_after_a_kill_gives_exactly_k_rows_per_edit(shards, tiny_model_dir, tmp_path, kill_part_way):
    """Kill the job part-way (its whole process group); every committed part holds whole edits, and the
    rerun completes the job with exactly K rows per edit, without recomputing what was committed."""
    for s in range(8):  # Ray reads a shard as one block, which reaches the driver whole: many small shards
        write_shard(tmp_path / f"big-{s}.tar", 3, seed=10 + s)  # 8 x 2 x 2 = 32 edits, 8 skipped
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "diffedit.pipelines.cli", "run", str(tmp_path / "big-*.tar"), "--output", str(out),
           "--model", str(tiny_model_dir), "--prompts", shards["rules"], "--steps", "4", "--mask-samples", "2",
           "--samples-per-edit", str(K), "--batch-size", "1"]
    kill_part_way(cmd, out, parts=2)
    before = parts(out)
    committed = len(read(out))
    total = 32 * K + 8
    assert 0 < committed < total, f"{committed} rows committed before the kill: not part-way"
    assert_whole_groups(out, K)
    summary = run_job(config(inputs=[str(tmp_path / "big-*.tar")], output=str(out), model=str(tiny_model_dir),
                                 prompts=shards["rules"], edit=dict(FAST), samples_per_edit=K, batch_size=1),
                      log=lambda *a: None)
    df = read(out)
    assert len(df) == total and df.edit_id.is_unique and summary["new_rows"] == total - committed
    edits = df[df.sample_index.notna()]
    assert edits.groupby(GROUP).size().eq(K).all() and edits.groupby(GROUP).ngroups == 32
    assert edits.groupby(GROUP).best.sum().eq(1).all()
    assert all(parts(out)[name] == t for name, t in before.items())
    assert_whole_groups(out, K)


def test_best_by_lpips_with_local_backbone_weights(shards, tiny_model_dir, tmp_path):
    """--lpips-weights end to end, and a lower-is-better score. The backbone is torchvision's AlexNet with
    random weights: it checks the plumbing only, its values are no LPIPS score."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    features = {k: v for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith("features.")}
    weights = tmp_path / "alexnet-random.safetensors"
    save_file(features, str(weights))
    out = tmp_path / "lpips"
    job(shards, out, tiny_model_dir, samples_per_edit=2, best_by="lpips", lpips_weights=str(weights))
    df = read(out)
    ok = df[df.status == "ok"]
    assert len(ok) == 12 and ok.lpips.notna().all() and (ok.lpips > 0).all()
    assert set(ok.loc[ok.groupby(GROUP).lpips.idxmin(), "edit_id"]) == set(ok[ok.best].edit_id)
    assert OutputStore(out).read_run()["scorers"]["lpips"]["weights"] == str(weights)


# -- the rules, without Ray ------------------------------------------------------------------------------


def row(key, edit_index, sample_index, score, status="ok", shard="s.tar"):
    return dict(shard=shard, key=key, edit_index=edit_index, sample_index=sample_index, status=status,
                clip_directional=score, lpips=score)


def test_better_is_a_table_over_every_score():
    assert set(BETTER) == set(SCORE_COLUMNS)
    assert {c for c, way in BETTER.items() if way == "lower"} == {"lpips"}
    with pytest.raises(ValueError, match="must be one of"):
        check_best_by("seed")


def test_mark_best_ties_nulls_errors_and_lower_is_better():
    rows = [row("a", 0, 0, 0.1), row("a", 0, 1, 0.3), row("a", 0, 2, 0.3),  # tie: the lower sample index
            row("b", 0, 0, None, "error"), row("b", 0, 1, None), row("b", 0, 2, None),  # no score: first ok
            row("c", 0, 0, float("nan")), row("c", 0, 1, 0.2), row("c", 0, 2, None),  # NaN is no score
            row("d", 0, 0, None, "error"), row("d", 0, 1, None, "error"),  # no ok sample: no best
            dict(shard="s.tar", key="e", edit_index=0, sample_index=None, status="skipped")]
    assert mark_best(rows, "clip_directional") == 1
    assert [r["best"] for r in rows] == [False, True, False, False, True, False, False, True, False, False, False,
                                         False]
    mark_best(rows[:3], "lpips")
    assert [r["best"] for r in rows[:3]] == [True, False, False]
    one = [row("a", 0, 0, None)]
    assert mark_best(one, "clip_directional") == 0 and one[0]["best"]  # k = 1: nothing to choose, nothing to say


def test_status_and_export_of_marked_rows_without_ray(tmp_path):
    from diffedit.manifests.export import export, status
    from diffedit.manifests.schema import empty_row

    def ok_row(key, s, score):
        return empty_row(key=key, shard="s.tar", edit_index=0, sample_index=s, edit_id=f"{key}{s}", status="ok",
                         source_prompt="a red dog", target_prompt="a blue dog",
                         seed=s, width=1, height=1, mask_png=b"m", edited_png=b"e", clip_directional=score)

    store = OutputStore(tmp_path / "out")
    store.begin(dict(sampling=dict(samples_per_edit=2, best_by="clip_directional")))
    rows = [ok_row("a", 0, 0.1), ok_row("a", 1, 0.2), ok_row("b", 0, None), ok_row("b", 1, None)]
    assert mark_best(rows, "clip_directional") == 1
    store.commit(rows)
    assert status(tmp_path / "out")["best_of_k"] == dict(samples_per_edit=2, best_by="clip_directional", edits=2,
                                                         edits_with_an_ok_sample=2, best_rows=2,
                                                         edits_best_without_score=1)
    assert export(tmp_path / "out", tmp_path / "best", best_only=True)["exported"] == 2
    unmarked = OutputStore(tmp_path / "old")
    unmarked.begin({})
    unmarked.commit([ok_row("a", 0, 0.1)])  # `best` null, as in a manifest written before schema version 2
    with pytest.raises(ValueError, match="no `best` mark"):
        export(tmp_path / "old", tmp_path / "none", best_only=True)
