"""Prompt pairs: caption (or class label) -> 0..k (source prompt, target prompt) edits, on the CPU.

Three sources, from a YAML/JSON file (``--prompts``) or a table:

    rules:                       # substitutions in the caption
      - from: dog                # whole word, case-preserving, simple plurals (dog/dogs)
        to: [cat, fox]           # one edit per target
    labels:                      # classified datasets (the sample's `cls`)
      names: {0: cat, 1: dog}    # class id -> name (or a list)
      targets: [fox, horse]      # edit every image to these classes (default: every other class)
      template: "a photo of a {label}"
    table: pairs.parquet         # explicit pairs (Parquet/CSV/JSONL: key, source_prompt, target_prompt)

The source prompt is the caption itself (the paper found the caption beats an empty reference text). A
sample that no rule matches yields one ``skipped`` row, never silence.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# Used when no --prompts file is given: colour and shape swaps, which is what the shipped model knows.
DEFAULT_RULES = [
    {"from": "red", "to": ["blue"]},
    {"from": "blue", "to": ["red"]},
    {"from": "green", "to": ["yellow"]},
    {"from": "yellow", "to": ["green"]},
    {"from": "circle", "to": ["square"]},
    {"from": "square", "to": ["circle"]},
    {"from": "dog", "to": ["cat"]},
    {"from": "cat", "to": ["dog"]},
]


@dataclass(frozen=True)
class Edit:
    source_prompt: str
    target_prompt: str


def _plural(word: str) -> str:
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


def _match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


@dataclass
class Rule:
    source: str
    targets: list[str]

    def __post_init__(self):
        forms = sorted({self.source, _plural(self.source)}, key=len, reverse=True)
        self.pattern = re.compile(r"\b(" + "|".join(re.escape(f) for f in forms) + r")\b", re.IGNORECASE)

    def apply(self, caption: str) -> list[str]:
        """One rewritten caption per target, or [] when the word does not occur."""
        if not self.pattern.search(caption):
            return []
        out = []
        for target in self.targets:
            def swap(m, target=target):
                plural = m.group(0).lower() != self.source.lower()
                return _match_case(m.group(0), _plural(target) if plural else target)

            out.append(self.pattern.sub(swap, caption))
        return out


@dataclass
class PromptSpec:
    rules: list[Rule] = field(default_factory=list)
    label_names: dict[str, str] = field(default_factory=dict)
    label_targets: list[str] | None = None
    template: str = "a photo of a {label}"
    table: dict[str, list[Edit]] | None = None

    @classmethod
    def default(cls) -> "PromptSpec":
        return cls.from_dict({"rules": DEFAULT_RULES})

    @classmethod
    def from_dict(cls, spec: dict, base: Path | None = None) -> "PromptSpec":
        unknown = set(spec) - {"rules", "labels", "table"}
        if unknown:
            raise ValueError(f"Unknown key(s) {sorted(unknown)} in the prompts file; expected rules, labels, table.")
        rules = []
        for i, r in enumerate(spec.get("rules") or []):
            if not isinstance(r, dict) or "from" not in r or "to" not in r:
                raise ValueError(f"Rule {i} must have `from` and `to`, got {r!r}.")
            targets = r["to"] if isinstance(r["to"], list) else [r["to"]]
            rules.append(Rule(str(r["from"]), [str(t) for t in targets]))
        out = cls(rules=rules)
        labels = spec.get("labels")
        if labels:
            names = labels.get("names") or {}
            out.label_names = {str(i): str(n) for i, n in (enumerate(names) if isinstance(names, list) else names.items())}
            out.label_targets = labels.get("targets")
            out.template = labels.get("template", out.template)
        if spec.get("table"):
            path = Path(spec["table"])
            out.table = load_table(path if path.is_absolute() or base is None else base / path)
        return out

    @classmethod
    def load(cls, path: str | Path | None) -> "PromptSpec":
        if path is None:
            return cls.default()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Prompts file {path} does not exist.")
        if path.suffix in (".parquet", ".csv", ".jsonl"):
            return cls(table=load_table(path))
        text = path.read_text()
        if path.suffix == ".json":
            spec = json.loads(text)
        else:
            import yaml

            spec = yaml.safe_load(text)
        if not isinstance(spec, dict):
            raise ValueError(f"Prompts file {path} must hold a mapping with rules, labels or table.")
        return cls.from_dict(spec, base=path.parent)

    def edits(self, key: str, caption: str | None, label: str | None) -> list[Edit]:
        """The edits of one sample, in a stable order (its edit indices)."""
        if self.table is not None:
            return list(self.table.get(key, []))
        out: list[Edit] = []
        if caption:
            for rule in self.rules:
                out += [Edit(caption, t) for t in rule.apply(caption) if t != caption]
        if label is not None and self.label_names:
            name = self.label_names.get(str(label), str(label))
            source = caption or self.template.format(label=name)
            targets = self.label_targets or [n for n in self.label_names.values() if n != name]
            out += [Edit(source, self.template.format(label=t)) for t in targets if t != name]
        return list(dict.fromkeys(out))


def load_table(path: Path) -> dict[str, list[Edit]]:
    import pandas as pd

    readers = {".parquet": pd.read_parquet, ".csv": pd.read_csv, ".jsonl": lambda p: pd.read_json(p, lines=True)}
    if path.suffix not in readers:
        raise ValueError(f"Pair table {path} must be .parquet, .csv or .jsonl.")
    df = readers[path.suffix](path)
    missing = {"key", "source_prompt", "target_prompt"} - set(df.columns)
    if missing:
        raise ValueError(f"Pair table {path} lacks column(s) {sorted(missing)}.")
    table: dict[str, list[Edit]] = {}
    for key, src, tgt in zip(df["key"].astype(str), df["source_prompt"].astype(str), df["target_prompt"].astype(str)):
        table.setdefault(key, []).append(Edit(src, tgt))
    return table
