"""Shared fixtures: tiny real diffusers models, built once per test session and saved as folders."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from diffedit.stages.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-eps")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from diffedit.stages.model import load_model

    return load_model(tiny_model_dir, device="cpu", dtype="fp32")
