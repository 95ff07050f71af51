"""Best-of-k: ``--samples-per-edit k`` edits every (sample, edit) with k seeds; ``best`` marks one of the k rows.

The k rows of an edit form a *group* (same shard, key and edit index; ``sample_index`` 0..k-1). The edit
actor computes a group in one call, and the driver commits a group in one part and only whole: ``best`` is
decided on all k rows, and a resume finds a group either committed whole or not at all.
"""

from __future__ import annotations

from collections import defaultdict

from .schema import SCORE_COLUMNS, missing

# Which way is better, for each score ``--best-by`` may name. Every score but LPIPS is a similarity (of the
# edit to a prompt, to the source image, or to the source inside / outside the mask): higher is better.
# LPIPS is a distance between the source and the edit: lower is better.
BETTER = {name: "lower" if name == "lpips" else "higher" for name in SCORE_COLUMNS}
DEFAULT_BEST_BY = "clip_directional"  # the image moved the way the prompts moved (InstructPix2Pix)
NO_SCORE_RULE = "when no ok sample of an edit has the score, the ok sample with the lowest sample_index (sample 0)"


def check_best_by(best_by: str) -> str:
    if best_by not in BETTER:
        raise ValueError(f"`--best-by` must be one of {', '.join(BETTER)} but is {best_by!r}.")
    return BETTER[best_by]


def group_key(row: dict) -> tuple | None:
    """The edit a row is a sample of; None for rows that are no edit (skipped, unreadable sample or shard)."""
    if row.get("sample_index") is None:
        return None
    return row["shard"], row["key"], row["edit_index"]


def mark_best(rows: list[dict], best_by: str) -> int:
    """Set ``best`` on whole groups: True on the ok row with the best ``best_by`` score (ties: the lowest
    sample_index), False on every other row. Returns how many groups had several ok samples and none scored
    (they fall back to :data:`NO_SCORE_RULE`)."""
    sign = 1 if check_best_by(best_by) == "higher" else -1
    groups = defaultdict(list)
    for r in rows:
        r["best"] = False
        if r["status"] == "ok" and group_key(r) is not None:
            groups[group_key(r)].append(r)
    unscored = 0
    for members in groups.values():
        scored = [r for r in members if not missing(r.get(best_by))]
        if scored:
            winner = max(scored, key=lambda r: (sign * r[best_by], -r["sample_index"]))
        else:
            winner = min(members, key=lambda r: r["sample_index"])
            unscored += len(members) > 1
        winner["best"] = True
    return unscored
