"""The job on a multi-node Ray cluster, simulated on one machine with `ray.cluster_utils.Cluster`.

The cluster: a head node without GPUs (where the driver runs, as on a real cluster) and two worker nodes
with one *logical* GPU each, so the job's GPU actors are scheduled as on GPU nodes; the work itself runs on
the CPU (torch sees no CUDA device here) with a tiny real model. Checked, with the real `diffedit run`:
  (a) the edit actors spread over both GPU nodes;
  (b) a GPU node removed mid-job: the job completes through Ray's retries, or a rerun of the same command
      completes it, and the manifest ends with exactly one row per (sample, edit), none lost;
  (c) the driver runs on the GPU-less head, and the edits still go to GPU actors on the GPU nodes;
  (d) autoscaling from 0: with `--num-gpus`, a job started before any GPU node exists waits for one (as
      the autoscaler would add) and edits there, rather than falling back to a CPU actor on the head.

The cluster lives in a child process (this file run as a script, driven over stdin/stdout), so this
module never calls ray.init or ray.shutdown in the pytest process: a local Ray that another test module
started is left alone. `diffedit run` runs as its own process with RAY_ADDRESS set, as `ray job submit`
runs it.
"""

from __future__ import annotations

import io
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARDS, PER_SHARD = 4, 6  # 24 samples, one edit each ("red" -> "blue")
TAG = "@@cluster@@ "  # marks the harness's replies on its private channel (see `harness`)

pytestmark = pytest.mark.skipif(
    not (ROOT / "pipelines" / "cli.py").exists(), reason="pipelines/cli.py (the job) does not exist yet"
)


# ---------------------------------------------------------------------------------------------------------
# The cluster harness: this file run as a script


def harness() -> None:
    """Start a head (2 CPUs, no GPU) and two workers (2 CPUs, 1 GPU each); then answer commands from stdin,
    one JSON line each: `state`, `remove I`, `add`, `quit` (or end of input)."""
    # Replies go out on a private copy of stdout; fd 1 itself, which the raylets, GCS and workers this
    # process starts inherit, now points at stderr (discarded by the test). Sharing fd 1 with them let their
    # output land in the middle of a reply line, and the reader could not parse it (seen on CI).
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)  # os.dup: not inherited by children
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    import ray
    import ray._private.state as ray_state
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # Cluster() records its address in /tmp/ray/ray_current_cluster, where a plain ray.init() in any other
    # process of this machine (another test session) would find it and join it: keep it to ourselves.
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)

    def reply(obj):
        channel.write(TAG + json.dumps(obj) + "\n")

    reply({"address": cluster.address, "head": cluster.head_node.node_id, "workers": [w.node_id for w in workers]})
    try:
        for line in sys.stdin:
            cmd = line.split()
            if not cmd:
                continue
            if cmd[0] == "state":
                actors = [
                    {
                        "class": a["ActorClassName"],
                        "state": a["State"],
                        "node": a["Address"]["NodeID"],
                        "owner_node": a["OwnerAddress"]["NodeID"],
                        "job": a["JobID"],
                        "restarts": a.get("NumRestarts", 0),
                    }
                    for a in ray_state.actors().values()
                ]
                nodes = [{"node": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]
                jobs = [{"job": j["JobID"], "entrypoint": j.get("Entrypoint", ""), "pid": j["DriverPid"]}
                        for j in ray_state.state.job_table()]
                reply({"actors": actors, "nodes": nodes, "jobs": jobs, "resources": ray.cluster_resources()})
            elif cmd[0] == "remove":  # remove I [graceful]: killed at once, or drained and unregistered
                node = workers.pop(int(cmd[1]))
                cluster.remove_node(node, allow_graceful=cmd[2:] == ["graceful"])
                reply({"removed": node.node_id})
            elif cmd[0] == "add":
                node = cluster.add_node(num_cpus=2, num_gpus=1)
                workers.append(node)
                cluster.wait_for_nodes()
                reply({"added": node.node_id})
            elif cmd[0] == "quit":
                break
    finally:
        ray.shutdown()
        cluster.shutdown()
        reply({"bye": True})


class ClusterHandle:
    """The pytest side of the harness."""

    def __init__(self):
        env = dict(os.environ, RAY_DEDUP_LOGS="0")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "harness"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        info = self._reply(timeout=120)
        self.address, self.head, self.workers = info["address"], info["head"], info["workers"]

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(TAG):
                try:
                    self.replies.put(json.loads(line[len(TAG):]))
                except json.JSONDecodeError as e:  # fail the waiting test with the line, not with a timeout
                    self.replies.put({"malformed": f"{e}: {line[:300]!r}"})
        self.replies.put(None)

    def _reply(self, timeout=60):
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the cluster harness gave no answer in {timeout} s") from None
        assert reply is not None, f"the cluster harness exited (code {self.proc.poll()})"
        assert "malformed" not in reply, f"the cluster harness sent a line that is not JSON: {reply['malformed']}"
        return reply

    def ask(self, command: str, timeout=60):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def remove_worker(self, i: int, graceful: bool = False) -> str:
        removed = self.ask(f"remove {i}" + (" graceful" if graceful else ""))["removed"]
        self.workers.remove(removed)
        return removed

    def add_worker(self) -> str:
        added = self.ask("add", timeout=120)["added"]
        self.workers.append(added)
        return added

    def close(self):
        try:
            self.ask("quit", timeout=60)
        finally:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ---------------------------------------------------------------------------------------------------------
# Fixtures: the cluster, shards, the model, and how to run the job


@pytest.fixture(scope="module")
def cluster():
    handle = ClusterHandle()
    yield handle
    handle.close()


def circle_png(color, seed) -> bytes:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    x, y = (int(v) for v in rng.integers(9, 23, 2))
    ImageDraw.Draw(image).ellipse([x - 7, y - 7, x + 7, y + 7], fill=color)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """SHARDS WebDataset tars of PER_SHARD samples each (png + txt), every caption matched by the rule."""
    import webdataset as wds

    folder = tmp_path_factory.mktemp("shards")
    keys = []
    for s in range(SHARDS):
        with wds.TarWriter(str(folder / f"shapes-{s:06d}.tar")) as sink:
            for i in range(PER_SHARD):
                key = f"s{s}-{i:03d}"
                sink.write({"__key__": key, "png": circle_png((200, 30, 30), s * 100 + i), "txt": "a red circle"})
                keys.append(key)
    prompts = folder / "prompts.yaml"
    prompts.write_text("rules:\n  - from: red\n    to: blue\n")
    pattern = str(folder / f"shapes-{{000000..{SHARDS - 1:06d}}}.tar")
    return {"pattern": pattern, "prompts": str(prompts), "keys": sorted(keys)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from diffedit.shapes.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


def run_args(shards, model_dir, out) -> list[str]:
    return [
        shards["pattern"],
        "--output", str(out),
        "--model", model_dir,
        "--prompts", shards["prompts"],
        "--batch-size", "2",
        "--steps", "10",
        "--mask-samples", "2",
    ]


def start_job(cluster, args) -> subprocess.Popen:
    """`diffedit run ARGS` as its own driver process, joined to the cluster through RAY_ADDRESS."""
    env = dict(os.environ, RAY_ADDRESS=cluster.address, HF_HUB_OFFLINE="1")
    code = "import sys; from diffedit.pipelines.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", code, "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )


def finish(proc: subprocess.Popen, timeout=240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"`diffedit run` did not finish in {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


def manifest_rows(out: Path):
    """The committed manifest rows (OUT/manifest/part-*.parquet), read with pyarrow alone."""
    import pyarrow.dataset as pads

    files = sorted((out / "manifest").glob("part-*.parquet"))
    assert files, f"no Parquet file under {out / 'manifest'}"
    return pads.dataset([str(f) for f in files], format="parquet").to_table().to_pylist()


def job_actors(state, pid: int, started: bool = True):
    """The edit actors of the `diffedit run` driver process `pid` (other sessions' drivers excluded)."""
    jobs = {j["job"] for j in state["jobs"] if j["pid"] == pid}
    if started:
        assert len(jobs) == 1, f"driver {pid} is not (or more than once) in the cluster's job table"
    return [a for a in state["actors"] if a["job"] in jobs and "EditActor" in a["class"]]


@pytest.fixture(scope="module")
def first_run(cluster, shards, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out-first")
    t0 = time.time()
    job = start_job(cluster, run_args(shards, model_dir, out))
    code, log = finish(job)
    state = cluster.ask("state")
    return {"out": out, "code": code, "log": log, "state": state, "pid": job.pid, "seconds": time.time() - t0}


# ---------------------------------------------------------------------------------------------------------
# The tests


def test_job_completes_on_the_cluster(first_run, shards):
    assert first_run["code"] == 0, first_run["log"][-4000:]
    rows = manifest_rows(first_run["out"])
    assert sorted(r["key"] for r in rows) == shards["keys"]
    assert {r["status"] for r in rows} == {"ok"}, [(r["key"], r["error"]) for r in rows if r["status"] != "ok"]
    assert {r["target_prompt"] for r in rows} == {"a blue circle"}


def test_actors_spread_over_the_gpu_nodes(first_run, cluster):
    """(a) The edit actors ran on both GPU nodes, and on nothing else."""
    actors = job_actors(first_run["state"], first_run["pid"])
    assert actors, "no edit actor of the job in the cluster's actor table"
    nodes = {a["node"] for a in actors}
    assert nodes == set(cluster.workers), f"edit actors on {len(nodes & set(cluster.workers))} of the 2 GPU nodes, " \
        f"and on {len(nodes - set(cluster.workers))} other node(s)"


def test_parts_are_written_by_the_actors_on_the_gpu_nodes(first_run, cluster):
    """Workers write their own parts (the driver on the head only renames them): every part's writer is an
    edit actor's process on a GPU node, none the driver."""
    import pyarrow.parquet as pq

    parts = sorted((first_run["out"] / "manifest").glob("part-*.parquet"))
    writers = [pq.read_schema(p).metadata[b"diffedit.writer"].decode() for p in parts]
    nodes = {w.split(",")[0].removeprefix("node ") for w in writers}
    assert parts and nodes <= set(cluster.workers), (writers, cluster.workers)
    assert not [w for w in writers if w.endswith(f"pid {first_run['pid']}")]


def test_driver_on_a_node_without_gpus(first_run, cluster):
    """(c) The driver ran on the head, which has no GPU; the job still used the GPU nodes' GPUs."""
    nodes = {n["node"]: n for n in first_run["state"]["nodes"]}
    assert nodes[cluster.head]["resources"].get("GPU", 0) == 0
    actors = job_actors(first_run["state"], first_run["pid"])
    assert {a["owner_node"] for a in actors} == {cluster.head}, "the job's driver is not on the head"
    assert actors and not [a for a in actors if a["node"] == cluster.head], "edit actors on the GPU-less head"
    # The job chose GPU actors from the cluster's resources, though the driver's node has none.
    chosen = [line for line in first_run["log"].splitlines() if line.startswith("editing with")]
    assert chosen and "GPU" in chosen[0], first_run["log"][-2000:]


def test_worker_node_removed_mid_job(cluster, shards, model_dir, tmp_path):
    """(b) A GPU node removed while the job runs: the job completes (Ray restarts the actor elsewhere and
    retries its work), or a rerun of the same command completes it; either way exactly one row per
    (sample, edit), none lost."""
    out = tmp_path / "out"
    args = run_args(shards, model_dir, out)
    job = start_job(cluster, args)
    # Wait until the job's edit actors are up on both GPU nodes, then take one node away.
    deadline = time.time() + 120
    while time.time() < deadline:
        state = cluster.ask("state")
        alive = {a["node"] for a in job_actors(state, job.pid, started=False) if a["state"] == "ALIVE"}
        if set(cluster.workers) <= alive:
            break
        assert job.poll() is None, "the job ended before its actors were up on both GPU nodes"
        time.sleep(0.5)
    else:
        raise AssertionError("the job's actors never ran on both GPU nodes")
    assert job.poll() is None, "the job finished before a node could be removed: give it more work"
    removed = cluster.remove_worker(0)
    code, log = finish(job)
    reran = False
    if code != 0:
        # Ray could not absorb the loss: the documented recovery is to run the same command again.
        reran = True
        code, log = finish(start_job(cluster, args))
    cluster.add_worker()  # give the cluster its second GPU node back
    assert code == 0, log[-4000:]
    rows = manifest_rows(out)
    pairs = [(r["key"], r["edit_id"]) for r in rows]
    assert len(pairs) == len(set(pairs)), f"doubled rows: {len(pairs) - len(set(pairs))}"
    assert sorted(r["key"] for r in rows) == shards["keys"], "rows lost"
    assert {r["status"] for r in rows} == {"ok"}
    print(f"node {removed[:8]} removed mid-job; {'completed by a rerun' if reran else 'completed through Ray retries'}")


def test_gpu_actors_requested_before_gpu_nodes_exist(cluster, shards, model_dir, tmp_path):
    """Autoscaling from 0: the job starts on a cluster with no GPU node and `--num-gpus 1`; a GPU node joins
    after the driver has started (what the autoscaler does for pending GPU actors). The edit actor must wait
    for it and run there, not fall back to a CPU actor on the head."""
    while cluster.workers:
        cluster.remove_worker(0, graceful=True)
    deadline = time.time() + 60
    while cluster.ask("state")["resources"].get("GPU", 0) > 0:
        assert time.time() < deadline, "the removed GPU nodes are still counted in the cluster's resources"
        time.sleep(0.5)
    job = start_job(cluster, run_args(shards, model_dir, tmp_path / "out") + ["--num-gpus", "1", "--limit", "4"])
    deadline = time.time() + 120
    while not [j for j in cluster.ask("state")["jobs"] if j["pid"] == job.pid]:
        assert job.poll() is None and time.time() < deadline, "the driver never joined the cluster"
        time.sleep(0.5)
    gpu_node = cluster.add_worker()
    code, log = finish(job)
    assert code == 0, log[-4000:]
    actors = job_actors(cluster.ask("state"), job.pid)
    assert actors and {a["node"] for a in actors} == {gpu_node}, "the edits did not run on the GPU node"


if __name__ == "__main__" and sys.argv[1:] == ["harness"]:
    harness()
