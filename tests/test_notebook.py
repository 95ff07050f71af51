"""The walkthrough notebook runs top to bottom (nbclient, a real Jupyter kernel), so it never rots.

It runs on the shipped shapes model when it is there, else on a tiny random model (through the notebook's
``DIFFEDIT_NOTEBOOK_MODEL``); an explicit ``DIFFEDIT_NOTEBOOK_MODEL`` in the environment wins.
"""

import os
from pathlib import Path

import pytest

from diffedit.stages.editor import SHIPPED_MODEL

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"
CELL_TIMEOUT_S = 600


def outputs_text(nb):
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out["text"])
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    model = os.environ.get("DIFFEDIT_NOTEBOOK_MODEL")
    if model is None and not SHIPPED_MODEL.is_dir():
        from diffedit.shapes.tiny import build_tiny_model

        model = str(build_tiny_model(tmp_path_factory.mktemp("notebook-model") / "tiny"))
    previous = os.environ.get("DIFFEDIT_NOTEBOOK_MODEL")
    if model is not None:
        os.environ["DIFFEDIT_NOTEBOOK_MODEL"] = model  # the kernel inherits this process's environment
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(
            nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
            resources={"metadata": {"path": str(tmp_path_factory.mktemp("notebook-cwd"))}},
        )
        client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails
    finally:
        if previous is None:
            os.environ.pop("DIFFEDIT_NOTEBOOK_MODEL", None)
        else:
            os.environ["DIFFEDIT_NOTEBOOK_MODEL"] = previous
    return nb, model


def test_walkthrough_runs_each_step(executed):
    nb, model = executed
    text = outputs_text(nb)
    expected_model = Path(model).resolve() if model else SHIPPED_MODEL
    assert f"model: {expected_model}" in text
    assert "largest pixel difference between the steps and editor.edit:" in text
    pictures = sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
    assert pictures >= 4  # the source, the mask step, the encoding levels, the edit
    assert "clip_directional" in text and "psnr_bg" in text and "mask_fraction" in text


def test_walkthrough_small_job(executed):
    nb, _ = executed
    text = outputs_text(nb)
    skipped = [line for line in text.splitlines() if line.startswith("SKIPPED small job:")]
    if skipped:
        pytest.skip(skipped[0])
    assert "rows;" in text and "gallery:" in text
