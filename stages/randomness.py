"""Per-image randomness: every random draw of an edit comes from its own generator.

The seed of an edit is derived from (global seed, sample identity, edit index, sample index) by a hash, so
an image's noise never depends on its batch-mates, the batch size, the actor, the GPU count or a resume.
Noise is drawn on the CPU in float32 and then moved, so it is also the same on CPU and GPU. In a job the
sample identity is ``manifests.schema.sample_id(shard, key)``, so the same key in two shards gets two
seeds; the Python API (``DiffEditor.edit``) passes its ``keys`` as they are. Sample 0 of an edit (the only
one with ``--samples-per-edit 1``, the default) has the seed of (global seed, identity, edit index) alone.
"""

from __future__ import annotations

import hashlib

import torch


def edit_seed(seed: int, key: str, edit_index: int = 0, sample_index: int = 0) -> int:
    # ``key`` is the sample's identity: a job passes manifests.schema.sample_id(shard, key)
    """A 63-bit seed for one (sample, edit, sample index): stable across Python versions and machines (no ``hash()``)."""
    text = f"{int(seed)}\x1f{key}\x1f{int(edit_index)}"
    if sample_index:  # sample 0 keeps the seed of the edit itself
        text += f"\x1f{int(sample_index)}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def per_image_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise of shape (len(seeds), *shape), image i drawn from its own generator seeded seeds[i]."""
    out = []
    for s in seeds:
        g = torch.Generator("cpu").manual_seed(int(s))
        out.append(torch.randn(shape, generator=g, dtype=torch.float32))
    return torch.stack(out)
