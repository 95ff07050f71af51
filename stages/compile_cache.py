"""Compiled graphs shared between processes: a folder of ``torch.compiler`` cache artefacts.

``torch.compile`` spends most of a cold start in Inductor (code generation, autotuning, the C++/Triton builds).
PyTorch can serialise what it built (``torch.compiler.save_cache_artifacts``: Inductor's FX graph cache,
AOTAutograd's cache and autotuning results) and load it into another process before it compiles
(``load_cache_artifacts``), which then finds its graphs in the cache instead of building them. Dynamo's tracing
still runs in every process.

A :class:`CompileCache` keeps those artefacts in a folder that every process (a second actor, a second run, an
actor restarted on another node) can read: one file per set of graphs some process built first, under a
sub-folder per PyTorch version and GPU, so an artefact is only offered to processes that can use it. Writes are
atomic (a temporary name, then a rename), so concurrent writers and readers never see a partial file.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
import warnings
from pathlib import Path

import torch


def environment_key(device: torch.device) -> str:
    """What an artefact is valid for: the PyTorch build and the GPU (or the CPU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", f"torch-{torch.__version__}-{name}").strip("-").lower()


def _keys(info) -> set[str]:
    return {f"{kind}/{key}" for kind, keys in (info.artifacts.items() if info else ()) for key in keys}


class CompileCache:
    """Load every artefact of ``folder`` for this environment (:meth:`load`); write the graphs this process built
    that the folder did not hold (:meth:`save`)."""

    def __init__(self, folder: str | Path, device: torch.device):
        self.folder = Path(folder) / environment_key(torch.device(device))
        self.known: set[str] = set()

    def load(self) -> int:
        """Load the folder's artefacts into this process's caches; returns how many graphs they hold. A file that
        cannot be read is skipped, with a warning: the graphs it held are compiled again."""
        try:
            paths = sorted(self.folder.glob("*.bin")) if self.folder.is_dir() else []
        except OSError as exc:
            warnings.warn(f"Compile cache {self.folder} not read: {exc}", stacklevel=2)
            paths = []
        for path in paths:
            try:
                self.known |= _keys(torch.compiler.load_cache_artifacts(path.read_bytes()))
            except Exception as exc:  # a truncated, unreadable or foreign file must not stop the actor
                warnings.warn(f"Compile cache {path} skipped: {type(exc).__name__}: {exc}", stacklevel=2)
        return len(self.known)

    def save(self) -> Path | None:
        """Write what this process compiled that the folder lacks, as one file named by its graphs; None if nothing
        is new."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return None
        data, info = saved
        new = _keys(info) - self.known
        if not new:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / (hashlib.sha256("\n".join(sorted(new)).encode()).hexdigest()[:32] + ".bin")
        staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        staging.write_bytes(data)
        os.replace(staging, path)
        self.known |= new
        return path
