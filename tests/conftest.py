"""Shared fixtures: tiny real diffusers models, built once per test session and saved as folders."""

import os
import signal
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from diffedit.shapes.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-eps")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from diffedit.stages.model import load_model

    return load_model(tiny_model_dir, device="cpu", dtype="fp32")


@pytest.fixture
def kill_part_way():
    """Start a `diffedit run` command line in its own process group (and its own local Ray) and SIGKILL the
    whole group once `parts` Parquet parts are committed in `out`; fails if the job ends first."""

    def run(cmd: list[str], out: Path, parts: int = 2, timeout: float = 180) -> None:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env)
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if (out / "manifest").exists() and len(list((out / "manifest").glob("part-*.parquet"))) >= parts:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(1)

    return run


# The fast tier (`python -m pytest -m "not slow"`, about 1.5 minutes on 2 cores): every test except those of the
# modules that run the whole job on a local Ray (or in a subprocess), a notebook, a browser or a cluster; a test of
# those modules marked `fast_tier` stays in it (one small job, end to end, through the command line).
SLOW_MODULES = {"test_job", "test_best_of_k", "test_faults", "test_eval", "test_notebook", "test_gallery",
                "test_cluster_multinode"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES and not item.get_closest_marker("fast_tier"):
            item.add_marker(pytest.mark.slow)
