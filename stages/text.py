"""Text conditioning as the DiffEdit steps pass it around: one row per (latent, prompt), whatever the family needs.

Stable Diffusion 1.x/2.x conditions on one tensor of token embeddings; SDXL adds a pooled embedding, SD3 and
FLUX.1 a pooled embedding too (their token embeddings join two or three encoders). The steps never look inside:
they select, repeat and concatenate rows, and the family's denoiser call reads the parts by name.

Shape legend: R rows, L tokens, D text width, P pooled width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Text:
    """Named tensors whose first dimension is the row: ``embeds`` (R x L x D) always, ``pooled`` (R x P) where the
    family has one."""

    parts: dict[str, torch.Tensor]

    @property
    def embeds(self) -> torch.Tensor:
        return self.parts["embeds"]

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, index) -> "Text":
        """Rows by an int, a slice, a list or a bool/long tensor, as tensor indexing (an int drops the row axis)."""
        return Text({k: v[index] for k, v in self.parts.items()})

    def __iter__(self):
        """Row by row, each without its row axis (as iterating a tensor)."""
        return (self[i] for i in range(len(self)))

    def expand(self, rows: int) -> "Text":
        """A one-row Text seen as ``rows`` rows (no copy)."""
        if len(self) != 1:
            raise ValueError(f"Only a one-row Text can be expanded; this one has {len(self)} rows.")
        return Text({k: v.expand(rows, *v.shape[1:]) for k, v in self.parts.items()})

    def repeat_interleave(self, n: int) -> "Text":
        return Text({k: v.repeat_interleave(n, dim=0) for k, v in self.parts.items()})

    def to(self, *args, **kwargs) -> "Text":
        return Text({k: v.to(*args, **kwargs) for k, v in self.parts.items()})

    @staticmethod
    def cat(texts: list["Text"]) -> "Text":
        """The rows of ``texts``, one after another."""
        keys = texts[0].parts.keys()
        if any(t.parts.keys() != keys for t in texts):
            raise ValueError("Texts of different families cannot be concatenated.")
        return Text({k: torch.cat([t.parts[k] for t in texts]) for k in keys})
