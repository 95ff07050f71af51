"""The manifest store without Ray: atomic parts, the committed set, refusal of changed parameters, status, export."""

import io
import json
import tarfile

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffedit.manifests.export import export, status
from diffedit.manifests.schema import SCHEMA, SCHEMA_VERSION, edit_id, empty_row
from diffedit.manifests.store import OutputStore, ParameterMismatch, schema_version


def png(size, color=0):
    buf = io.BytesIO()
    Image.new("L", size, color).save(buf, "PNG")
    return buf.getvalue()


def rows(n, start=0):
    out = []
    for i in range(start, start + n):
        key = f"a/../{i}"  # a hostile key: must never become a path
        out.append(empty_row(key=key, edit_id=edit_id("s.tar", key, 0, "a red dog", "a blue dog"), edit_index=0, shard="s.tar",
                             source_prompt="a red dog", target_prompt="a blue dog", status="ok", seed=i, width=5,
                             height=3, mask_png=png((5, 3), 255), mask_fraction=1.0, edited_png=png((5, 3)),
                             clip_target=0.1 * i))
    return out


IDENTITY = dict(steps=4, seed=0, model_fingerprint="abc", image_format="png", prompts_digest="default",
                caption_field="txt", save_latents=False, resolution=32, scorers=None)
RUN = dict(schema_version=SCHEMA_VERSION, identity=IDENTITY)


def reseeded(seed: int) -> dict:
    return {**RUN, "identity": {**IDENTITY, "seed": seed}}


def test_parts_are_atomic_and_committed_set_is_their_union(tmp_path):
    store = OutputStore(tmp_path)
    store.begin(RUN)
    part = store.commit(rows(3))
    store.commit(rows(2, start=3))
    assert schema_version(part) == SCHEMA_VERSION
    assert pq.read_schema(part).names == SCHEMA.names
    # What a SIGKILL during a commit leaves: a temporary part, named as commit() names it.
    (store.parts / ".tmp-part-dead.parquet.partial").write_bytes(b"half a file")
    assert store.committed_ids() == {r["edit_id"] for r in rows(5)}
    for df in (pd.concat(map(pd.read_parquet, sorted(store.parts.glob("*.parquet")))),  # plain pandas
               pd.read_parquet(store.parts)):
        assert len(df) == 5 and df.edit_id.is_unique
    store.begin(RUN)  # resume: the stale temporary part is removed, the committed ones stay
    assert not list(store.parts.glob(".tmp-*")) and len(store.part_files()) == 2


def test_changed_parameters_are_refused_unless_overwrite(tmp_path):
    store = OutputStore(tmp_path)
    store.begin(RUN)
    store.commit(rows(2))
    with pytest.raises(ParameterMismatch, match="seed: 0 -> 1.*--overwrite"):
        store.begin(reseeded(1))
    assert len(store.committed_ids()) == 2
    store.begin(reseeded(1), overwrite=True)
    assert store.committed_ids() == set() and store.read_run()["identity"]["seed"] == 1


def test_the_refusal_names_only_what_changed(tmp_path):
    store = OutputStore(tmp_path)
    store.begin({**RUN, "identity": {**IDENTITY, "guidance": 7.5}})
    store.commit(rows(1))
    with pytest.raises(ParameterMismatch) as refused:
        store.begin({**RUN, "identity": {**IDENTITY, "guidance": 5.0, "image_format": "jpeg"}})
    detail = str(refused.value).split("(", 1)[1].split(")")[0]
    assert detail == "guidance: 7.5 -> 5.0; image_format: 'png' -> 'jpeg'"
    store.run_json.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "edit": {"steps": 4}}))  # older record
    with pytest.raises(ParameterMismatch, match="older version of diffedit.*--overwrite"):
        store.begin(RUN)


def test_a_job_that_committed_nothing_takes_new_parameters(tmp_path):
    """A job refused at its start (say --fp8 on a cluster without GPUs) left run.json but no rows: nothing can be
    mixed, so the corrected command runs; once rows exist, a change is refused."""
    store = OutputStore(tmp_path)
    store.begin(RUN)
    store.begin(reseeded(1))
    assert store.read_run()["identity"]["seed"] == 1
    store.commit(rows(1))
    with pytest.raises(ParameterMismatch, match="seed: 1 -> 2"):
        store.begin(reseeded(2))


def test_a_job_recorded_before_an_identity_key_existed_resumes_at_that_keys_old_value(tmp_path):
    """A job run before --solver existed ran DDIM: resuming it with the default is the same job; with dpm it is not."""
    store = OutputStore(tmp_path)
    store.begin(RUN)  # recorded without "solver"
    store.commit(rows(1))
    added = {"identity_defaults": {"solver": "ddim"}}
    with pytest.raises(ParameterMismatch, match="solver: 'ddim' -> 'dpm'"):
        store.begin({**RUN, **added, "identity": {**IDENTITY, "solver": "dpm"}})
    store.begin({**RUN, **added, "identity": {**IDENTITY, "solver": "ddim"}})
    assert len(store.committed_ids()) == 1


def test_staged_parts_are_invisible_until_committed_and_removed_if_never_committed(tmp_path):
    """Workers stage parts; the driver commits one by renaming it; a part staged but never committed (a killed
    driver, a task Ray ran twice) is removed when a run begins or ends, and no reader ever sees it."""
    store = OutputStore(tmp_path)
    store.begin(RUN)
    kept, lost = store.stage(rows(2)), store.stage(rows(3, start=2))
    assert store.committed_ids() == set() and len(pd.read_parquet(store.parts)) == 0 == store.read().num_rows
    part = store.commit_staged(kept)
    assert part.name.startswith("part-") and not (store.parts / kept).exists()
    assert store.committed_ids() == {r["edit_id"] for r in rows(2)} and len(pd.read_parquet(store.parts)) == 2
    with pytest.raises(ValueError, match="not a staged part"):
        store.commit_staged("../run.json")
    store.finish({})
    assert not (store.parts / lost).exists() and len(store.part_files()) == 1
    lost = store.stage(rows(1, start=9))
    store.begin(RUN)
    assert not (store.parts / lost).exists() and len(store.part_files()) == 1


def test_a_manifest_of_another_schema_version_is_refused_by_name(tmp_path):
    store = OutputStore(tmp_path)
    store.begin({**RUN, "schema_version": "1"})
    store.commit(rows(2))
    now = {**RUN, "schema_version": SCHEMA_VERSION}
    with pytest.raises(ParameterMismatch, match=rf"schema version 1, written by another version of diffedit; this one "
                                                rf"writes version {SCHEMA_VERSION}.*--overwrite"):
        store.begin(now)
    assert len(store.committed_ids()) == 2
    store.begin(now, overwrite=True)
    assert store.committed_ids() == set() and store.read_run()["schema_version"] == SCHEMA_VERSION


def test_status_and_export(tmp_path):
    store = OutputStore(tmp_path / "out")
    store.begin(RUN)
    bad = empty_row(key="x", edit_id="e", edit_index=0, shard="s.tar", status="error", error="cannot decode image: x")
    store.commit(rows(4) + [bad])
    st = status(tmp_path / "out")
    assert st["by_status"] == {"ok": 4, "error": 1} and not st["completed"]
    assert st["top_errors"] == {"cannot decode image": 1}
    store.finish({})
    assert status(tmp_path / "out")["completed"]

    result = export(tmp_path / "out", tmp_path / "wds", where="clip_target >= 0.15")
    assert result["exported"] == 2
    with tarfile.open(next((tmp_path / "wds").glob("*.tar"))) as tar:
        names = tar.getnames()
        assert all(".." not in n and "/" not in n for n in names)
        metas = [json.loads(tar.extractfile(n).read()) for n in names if n.endswith(".json")]
    assert sorted(m["key"] for m in metas) == ["a/../2", "a/../3"]
    assert {m["target_prompt"] for m in metas} == {"a blue dog"}
    with pytest.raises(ValueError, match="not a valid filter"):
        export(tmp_path / "out", tmp_path / "wds2", where="no_such_column > 1")
    with pytest.raises(FileNotFoundError, match="no run.json"):
        status(tmp_path / "nothing")
