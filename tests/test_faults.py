"""The faults an adversarial review found in the job, each reproduced: nothing lost, doubled or stopped.

Real tars (webdataset's TarWriter, and tarfile where a tar must be malformed), a real local Ray, the tiny
real model on CPU, scores off where they are not the point (faster).
"""

import functools
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from diffedit.manifests.store import OutputLocked, OutputStore, ParameterMismatch
from diffedit.pipelines.cli import main as cli_main
from diffedit.pipelines.config import JobConfig
from diffedit.pipelines.job import plan_job, run_job

FAST = dict(steps=2, mask_samples=1)
RULES = "rules:\n  - from: red\n    to: blue\n"


def config(inputs, output, edit=(), **options) -> JobConfig:
    """A job's config from flat options, as the command line gives them (edit: flat edit parameters)."""
    return JobConfig.from_flat(inputs, output, **dict(edit), **options)



def png(seed: int, size=(24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def gif(seed: int) -> bytes:
    buf = io.BytesIO()
    frames = [Image.open(io.BytesIO(png(seed + i))).convert("P") for i in range(2)]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def write_shard(path: Path, keys: list[str], seed: int = 0) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for i, key in enumerate(keys):
            sink.write({"__key__": key, "png": png(seed + i), "txt": "a red circle"})
    return path


def raw_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members, in this order (duplicates and odd names allowed)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def job(inputs, out, model, log=lambda *a: None, **kw) -> dict:
    options = dict(inputs=[str(i) for i in inputs], output=str(out), model=str(model), prompts=kw.pop("prompts"),
                   edit=dict(FAST), batch_size=4, scores=False)
    options.update(kw)
    return run_job(config(**options), log=log)


def read(out) -> pd.DataFrame:
    files = sorted((Path(out) / "manifest").glob("part-*.parquet"))
    if not files:
        return pd.DataFrame(columns=["key", "status", "error", "edit_id", "seed", "shard"])
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return str(path)


# -- identities (items 5, 6) -----------------------------------------------------------------------------------

def test_same_key_in_two_shards_is_two_samples_and_a_shard_named_twice_is_one(tmp_path, tiny_model_dir, rules,
                                                                              monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "a.tar", ["000000", "000001"], seed=0)
    write_shard(data / "b.tar", ["000000", "000001"], seed=10)  # per-shard numbering: the same keys
    monkeypatch.chdir(data)
    out = tmp_path / "out"
    job(["*.tar", "a.tar", str(data / "a.tar")], out, tiny_model_dir, prompts=rules)
    df = read(out)
    assert len(df) == 4 and (df.status == "ok").all()
    assert df.edit_id.is_unique and df.seed.is_unique
    assert set(df.shard) == {str((data / "a.tar").resolve()), str((data / "b.tar").resolve())}

    # Adding the second shard to an existing output edits its samples (they are not "already committed").
    out2 = tmp_path / "out2"
    job([data / "a.tar"], out2, tiny_model_dir, prompts=rules)
    assert len(read(out2)) == 2
    summary = job([data / "a.tar", data / "b.tar"], out2, tiny_model_dir, prompts=rules)
    assert summary["new_by_status"] == {"ok": 2}
    df2 = read(out2)
    assert len(df2) == 4 and df2.edit_id.is_unique
    assert sorted(df2.edit_id) == sorted(df.edit_id)  # the same identities, whatever the working folder


# -- bad samples never stop the job (items 2, 3, 4, 13, 16: formats) -------------------------------------------

def test_bad_members_are_error_rows_and_the_job_goes_on(tmp_path, tiny_model_dir, rules):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    bad = raw_tar(tmp_path / "bad.tar", [
        ("good.png", png(1)), ("good.txt", b"a red circle"),
        ("deep.png", png(2)), ("deep.json", b"[" * 100_000),
        ("digits.png", png(3)), ("digits.json", b'{"caption": "a red circle", "n": ' + b"9" * 5001 + b"}"),
        ("a.png", png(4)), ("b.png", png(5)), ("b.txt", b"a red circle"), ("a.txt", b"a red circle"),  # not contiguous
        ("dup.png", png(6)), ("dup.png", png(7)), ("dup.txt", b"a red circle"),
        ("reserved.png", png(8)), ("reserved.txt", b"a red circle"), ("reserved.__key__", b"x"),
        ("eps.png", eps), ("eps.txt", b"a red circle"),
        ("huge.png", png(9)), ("huge.txt", b"a red circle" + b" " * 300_000),
        ("badmask.png", png(10)), ("badmask.txt", b"a red circle"), ("badmask.mask.png", b"\x89PNG not really"),
        ("anim.gif", gif(11)), ("anim.txt", b"a red circle"),
    ])
    good = write_shard(tmp_path / "good.tar", ["g0", "g1"])
    out = tmp_path / "out"
    job([bad, good], out, tiny_model_dir, prompts=rules, max_member_bytes=200_000)
    df = read(out).set_index("key")
    assert df.index.is_unique
    ok = {"good", "a", "b", "g0", "g1", "anim"}
    assert set(df.index[df.status == "ok"]) == ok
    errors = df.loc[sorted(set(df.index) - ok)]
    assert (errors.status == "error").all(), errors[["status", "error"]]
    assert "nested too deeply" in errors.loc["deep", "error"]
    assert "digits" in errors.loc["digits", "error"] or "not valid JSON" in errors.loc["digits", "error"]
    assert "dup.png" in errors.loc["dup", "error"]
    assert "__key__" in errors.loc["reserved", "error"]
    assert "cannot decode image" in errors.loc["eps", "error"]
    assert "200000" in errors.loc["huge", "error"]
    assert errors.loc["badmask", "error"].startswith("mask member: cannot decode image")


# -- unreadable, truncated, remote shards; retries (items 8, 9) -------------------------------------------------

@pytest.fixture
def http_folder(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_unreadable_shards_are_error_rows_and_a_rerun_retries_them(tmp_path, tiny_model_dir, rules, http_folder):
    served, url = http_folder
    write_shard(served / "remote.tar", ["r0"])
    truncated = write_shard(tmp_path / "cut.tar", ["c0", "c1", "c2"])
    whole = truncated.read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    broken_image = raw_tar(tmp_path / "img.tar", [("x.png", png(1)[:60]), ("x.txt", b"a red circle")])
    unreachable = "s3://diffedit-test/shard.tar?endpoint_override=127.0.0.1:9&scheme=http"  # nothing listens there
    inputs = [truncated, broken_image, f"{url}/remote.tar", f"{url}/missing.tar", unreachable]
    out = tmp_path / "out"
    said = []
    summary = job(inputs, out, tiny_model_dir, prompts=rules, log=said.append)
    df = read(out)
    assert df.edit_id.is_unique
    errors = df[df.status == "error"]
    shard_errors = errors[errors.key.str.startswith("<shard")]
    assert set(shard_errors.shard) == {str(truncated), f"{url}/missing.tar", unreachable}, errors[["key", "shard", "error"]]
    assert "could not be read" in shard_errors.set_index("shard").loc[unreachable, "error"]
    assert "x" in set(errors.key)
    assert "r0" in set(df.key[df.status == "ok"])
    assert summary["total_by_status"]["error"] == len(errors)
    from diffedit.manifests.export import status

    assert f"{len(errors)} error row(s), which rerunning" in status(out)["left"]
    assert any(f"{len(errors)} error row(s), 3 of them for shards that could not be read" in s for s in said), said

    # Repair all but the s3 shard, and leave that one out of the rerun: the rerun edits what failed and nothing
    # twice, and the error row of the shard it does not read stays.
    truncated.write_bytes(whole)
    raw_tar(broken_image, [("x.png", png(1)), ("x.txt", b"a red circle")])
    write_shard(served / "missing.tar", ["m0"])
    inputs.remove(unreachable)
    job(inputs, out, tiny_model_dir, prompts=rules)
    df = read(out)
    assert (df[df.shard != unreachable].status == "ok").all(), df[["key", "status", "error"]]
    assert sorted(df.key[df.shard != unreachable]) == ["c0", "c1", "c2", "m0", "r0", "x"] and df.edit_id.is_unique
    assert (df[df.shard == unreachable].status == "error").all() and (df.shard == unreachable).sum() == 1

    # Errors kept on request: nothing to retry, nothing recomputed.
    assert job(inputs, out, tiny_model_dir, prompts=rules, retry_errors=False)["new_rows"] == 0


def test_kept_error_rows_are_not_edited_again_beside_a_repaired_input(tmp_path, tiny_model_dir, rules):
    bad_json = raw_tar(tmp_path / "json.tar", [("j.png", png(1)), ("j.txt", b"a red circle"), ("j.json", b"{oops")])
    cut = write_shard(tmp_path / "cut.tar", ["c0", "c1"])
    whole = cut.read_bytes()
    cut.write_bytes(whole[:100])  # not even one header: the shard's own error row only
    out = tmp_path / "out"
    job([bad_json, cut], out, tiny_model_dir, prompts=rules)
    before = read(out)
    assert (before.status == "error").all() and len(before) == 2
    raw_tar(bad_json, [("j.png", png(1)), ("j.txt", b"a red circle"), ("j.json", b"{}")])
    cut.write_bytes(whole)
    assert job([bad_json, cut], out, tiny_model_dir, prompts=rules, retry_errors=False)["new_rows"] == 0
    assert sorted(read(out).edit_id) == sorted(before.edit_id)  # kept as they were, nothing beside them
    job([bad_json, cut], out, tiny_model_dir, prompts=rules)  # the default retries them
    after = read(out)
    assert (after.status == "ok").all() and sorted(after.key) == ["c0", "c1", "j"]


def test_a_retry_uncommits_whole_edits_of_the_shards_it_reads_only(tmp_path):
    from diffedit.manifests.schema import empty_row

    def row(shard, key, sample, status):
        return empty_row(key=key, edit_id=f"{shard}-{key}-{sample}", shard=shard, edit_index=0, sample_index=sample,
                         status=status)

    store = OutputStore(tmp_path / "out")
    store.begin({"schema_version": "3"})
    store.commit([row("a", "k", 0, "ok"), row("a", "k", 1, "error"), row("a", "j", 0, "ok"), row("a", "j", 1, "ok")])
    store.commit([row("b", "k", 0, "error"), row("b", "k", 1, "error")])
    store.close()
    store = OutputStore(tmp_path / "out")
    assert store.begin({"schema_version": "3"}, retry=frozenset({"a"})) == 1
    # Both samples of the failed edit of shard a go (it is edited again whole); shard b is not read: kept.
    assert store.committed_ids() == {"a-j-0", "a-j-1", "b-k-0", "b-k-1"}
    store.close()


# -- one job at a time (item 7) ---------------------------------------------------------------------------------

def test_a_second_job_on_the_same_output_is_refused_and_a_killed_job_leaves_no_lock(tmp_path, tiny_model_dir, rules):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from diffedit.manifests.store import OutputStore; "
         f"s = OutputStore({str(out)!r}); s.lock(); print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        shard = write_shard(tmp_path / "a.tar", ["k"])
        with pytest.raises(OutputLocked, match=f"pid {holder.pid}"):
            job([shard], out, tiny_model_dir, prompts=rules)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    store = OutputStore(out)
    store.lock()  # the kernel released the killed holder's lock
    store.close()


# -- run.json (item 15) -----------------------------------------------------------------------------------------

def test_parts_without_run_json_and_a_corrupt_run_json(tmp_path):
    from diffedit.manifests.schema import empty_row

    store = OutputStore(tmp_path / "out")
    store.begin({"schema_version": "3", "seed": 0})
    store.commit([empty_row(key="k", edit_id="e", shard="s", edit_index=0, status="skipped")])
    store.close()
    (tmp_path / "out" / "run.json").unlink()
    with pytest.raises(ParameterMismatch, match="run.json is missing"):
        OutputStore(tmp_path / "out").begin({"schema_version": "3", "seed": 0})
    (tmp_path / "out" / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"run\.json is not valid JSON.*--overwrite"):
        OutputStore(tmp_path / "out").begin({"schema_version": "3", "seed": 0})
    store = OutputStore(tmp_path / "out")
    store.begin({"schema_version": "3", "seed": 0}, overwrite=True)
    assert store.committed_ids() == set() and store.read_run()["seed"] == 0


def test_an_edit_to_the_table_a_yaml_points_to_is_a_parameter_change(tmp_path, tiny_model_dir):
    shard = write_shard(tmp_path / "a.tar", ["k"])
    (tmp_path / "pairs.csv").write_text("key,source_prompt,target_prompt\nk,a red circle,a blue circle\n")
    (tmp_path / "p.yaml").write_text("table: pairs.csv\n")
    options = config(inputs=[str(shard)], output=str(tmp_path / "out"), model=str(tiny_model_dir),
                         prompts=str(tmp_path / "p.yaml"), scores=False)
    before = plan_job(options, log=lambda *a: None).run["prompts_digest"]
    (tmp_path / "pairs.csv").write_text("key,source_prompt,target_prompt\nk,a red circle,a green circle\n")
    assert plan_job(options, log=lambda *a: None).run["prompts_digest"] != before


# -- one line, non-zero exit (item 16) --------------------------------------------------------------------------

def run_cli(args, capsys) -> tuple[int, str]:
    rc = cli_main(args)
    err = capsys.readouterr().err
    return rc, err


def test_user_errors_are_one_line_and_a_non_zero_exit(tmp_path, tiny_model_dir, rules, capsys, monkeypatch):
    shard = write_shard(tmp_path / "a.tar", ["k"])
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    common = ["--model", str(tiny_model_dir), "--prompts", rules, "--device", "cpu", "--steps", "2",
              "--mask-samples", "1", "--no-scores"]

    import diffedit.stages.sources as model_module

    def no_loading(*a, **k):
        raise AssertionError("the model was looked at before --output was checked")

    with monkeypatch.context() as m:
        m.setattr(model_module, "describe_model", no_loading)
        rc, err = run_cli(["run", str(shard), "--output", str(a_file), *common], capsys)
    assert rc == 2 and err.count("\n") == 1 and "is not a folder" in err and "Error" not in err

    for limit in ("0", "-1"):
        rc, err = run_cli(["run", str(shard), "--output", str(tmp_path / "o0"), *common, "--limit", limit], capsys)
        assert rc == 2 and "`--limit` must be >= 1" in err and err.count("\n") == 1

    rc, err = run_cli(["run", str(tmp_path / "does-not-exist.tar"), "--output", str(tmp_path / "o1"), *common], capsys)
    assert rc == 2 and err.count("\n") == 1 and "does-not-exist.tar" in err

    rc, err = run_cli(["run", str(shard), "--output", str(tmp_path / "o2"), *common[:-1], "--lpips-weights",
                       str(a_file)], capsys)
    assert rc == 2 and err.startswith("diffedit run: error: ") and err.count("\n") == 1, err

    import errno

    def full_disk(self, name):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(OutputStore, "commit_staged", full_disk)  # the driver's commit (workers stage parts)
        rc, err = run_cli(["run", str(shard), "--output", str(tmp_path / "o3"), *common], capsys)
    assert rc == 2 and "No space left on device" in err and err.count("\n") == 1, err


def test_an_actor_that_cannot_start_is_one_line(tmp_path, tiny_model_dir, rules, capsys):
    """Weights that the driver only fingerprints (it never loads them) but that the actors cannot load: the job
    ends with one line naming the actor's error, not Ray's traceback of a dead actor."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{not json")
    shard = write_shard(tmp_path / "a.tar", ["k"])
    rc, err = run_cli(["run", str(shard), "--output", str(tmp_path / "out"), "--model", str(model), "--prompts",
                       rules, "--device", "cpu", "--no-scores", "--progress-seconds", "600"], capsys)
    assert rc == 2 and err.startswith("diffedit run: error: an edit actor could not start: ") and err.count("\n") == 1, err


def test_a_read_only_output_is_one_line(tmp_path, tiny_model_dir, rules, capsys, monkeypatch):
    shard = write_shard(tmp_path / "a.tar", ["k"])
    parent = tmp_path / "read-only"
    parent.mkdir()
    args = ["run", str(shard), "--output", str(parent / "out"), "--model", str(tiny_model_dir), "--prompts", rules,
            "--device", "cpu", "--no-scores"]
    if os.geteuid() != 0:  # a real read-only folder (root writes through file modes)
        parent.chmod(0o555)
        try:
            rc, err = run_cli(args, capsys)
        finally:
            parent.chmod(0o755)
    else:  # as root: the filesystem's answer, simulated where the output folder is made
        real_mkdir = Path.mkdir

        def read_only(self, *a, **k):
            if str(self).startswith(str(parent)):
                raise PermissionError(13, "Permission denied", str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", read_only)
        rc, err = run_cli(args, capsys)
    assert rc == 2 and err.startswith("diffedit run: error: PermissionError") and err.count("\n") == 1, err
    assert "read-only" in err or "Permission denied" in err


def test_status_into_a_closed_pipe_is_quiet(tmp_path):
    from diffedit.manifests.schema import empty_row

    store = OutputStore(tmp_path / "out")
    store.begin({"schema_version": "3"})
    store.commit([empty_row(key=f"k{i}", edit_id=f"e{i}", shard="s", edit_index=0, status="skipped",
                            error="x" * 100) for i in range(50)])
    store.close()
    proc = subprocess.run(f"{sys.executable} -m diffedit.pipelines.cli status {tmp_path / 'out'} | head -1",
                          shell=True, capture_output=True, text=True)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


# -- what a user sees while the job runs (item 17) --------------------------------------------------------------

@pytest.mark.fast_tier
def test_progress_from_the_start_and_no_ray_noise(tmp_path, tiny_model_dir, rules):
    shard = write_shard(tmp_path / "a.tar", [f"k{i}" for i in range(6)])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "diffedit.pipelines.cli", "run", str(shard), "--output", str(tmp_path / "out"),
         "--model", str(tiny_model_dir), "--prompts", rules, "--device", "cpu", "--steps", "2", "--mask-samples", "1",
         "--no-scores", "--batch-size", "2", "--progress-seconds", "0.5"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert any("actor(s) ready" in ln for ln in lines), proc.stderr
    assert any("samples 6/6" in ln for ln in lines) or any("samples" in ln and "/6" in ln for ln in lines), proc.stderr
    for noise in ("core_worker", "Progress bars disabled", "token", "INFO worker.py"):
        assert noise not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1].removeprefix("done: "))["total_by_status"] == {"ok": 6}
