"""Prompt pairs: caption (or class label) -> 0..k (source prompt, target prompt) edits, on the CPU.

Three sources, from a YAML/JSON file (``--prompts``) or a table:

    rules:                       # substitutions in the caption
      - from: dog                # whole word, case-preserving, simple plurals (dog/dogs)
        to: [cat, fox]           # one edit per target
        count: 1                 # the first n matches, in caption order (default 1), or `all`
    labels:                      # classified datasets (the sample's `cls`)
      names: {0: cat, 1: dog}    # class id -> name (or a list)
      targets: [fox, horse]      # edit every image to these classes (default: every other class)
      template: "a photo of a {label}"

or, alone, ``table: pairs.parquet``: explicit pairs (Parquet/CSV/JSONL: key, source_prompt, target_prompt; a
key on several rows has several edits), also given directly as ``--prompts pairs.parquet``.

By default (``count: 1``) a rule replaces its first match only: one edit changes one object
("a green square, a purple square" -> "a green circle, a purple square"), so DiffEdit's mask localises one
object, which is what a counterfactual pair wants. ``count: n`` replaces the first n matches (singular and
plural forms alike), ``count: all`` every occurrence. Rules never chain: each one rewrites the caption on its
own (one edit per rule and target), and its count counts its own matches.

The source prompt is the caption itself (the paper found the caption beats an empty reference text). A
sample that no rule matches yields one ``skipped`` row, never silence; ``skip_reason`` says why.

The whole file is checked by ``PromptSpec.load`` before any work, and every problem is a ``ValueError``
naming the file and the entry. Text values (``from``, ``to``, ``targets``, ``names``) must be strings:
YAML rewrites unquoted numbers and words (``010`` -> 8, ``yes`` -> True, ``1.10`` -> 1.1), so a number is
refused with a hint to quote it rather than turned back into text that the user did not write. Class ids
(the keys of ``names``) may be integers. Table columns are read as text, never inferred (``000001`` stays
``000001``: WebDataset keys are strings).

An English article directly before a replaced word agrees with the new word ("a red circle" -> "an
orange circle", "an astronaut" -> "a diver"); so does one directly before ``{label}`` in a template.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import string
import sys
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
DEFAULT_TEMPLATE = "a photo of a {label}"
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl")
TABLE_COLUMNS = ("key", "source_prompt", "target_prompt")
MAX_FILE_BYTES = 64 * 2**20  # a YAML/JSON prompts file; a real one is kilobytes
MAX_ENTRIES = 100_000  # rules + their targets + class names + label targets, in all
# Bumped when the same spec would give other prompts (digest() then changes). 2: a/an agreement.
# 3: a rule replaces its first match only (`count`, default 1); before, every occurrence.
PROMPTS_VERSION = 3
DEFAULT_COUNT = 1  # a rule's `count`; None in a Rule (`count: all` in a file): every occurrence

# Skip reasons (the `error` of a skipped row).
NOT_IN_TABLE = "key not in the pair table"
NO_CAPTION = "no caption or label"
NO_MATCH = "no prompt rule matches"


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


# "an" before a vowel sound. The first letter decides (a e i o u), except for these common starts, where
# the sound differs from the letter; a word not starting with a letter (a digit, a quote) keeps its article.
_AN_STARTS = ("hour", "honest", "honor", "honour", "heir", "unin", "unid")  # silent h; un- + vowel
_A_STARTS = ("uni", "use", "usu", "uti", "eu", "ewe", "one", "once")  # a "yoo" or "w" sound
_ARTICLE_BEFORE = re.compile(r"\b(an?)(\s+)$", re.IGNORECASE)


def _article_for(word: str) -> str | None:
    """``"a"`` or ``"an"`` before ``word`` (its first word decides), or None to leave the article alone."""
    w = word.lstrip().lower()
    if not w[:1].isalpha():
        return None
    if w.startswith(_AN_STARTS):
        return "an"
    if w.startswith(_A_STARTS):
        return "a"
    return "an" if w[0] in "aeiou" else "a"


def _agree(article: str, word: str, shown: str) -> str:
    """``article`` (as written) made to agree with ``word``; ``shown`` is the word as it will appear (its case)."""
    wanted = _article_for(word)
    if wanted is None or wanted == article.lower():
        return article
    if article.isupper() and (len(article) > 1 or (shown.isupper() and len(shown) > 1)):
        return wanted.upper()  # "AN APPLE", "A RED" -> "AN ORANGE"
    return _match_case(article, wanted)


@dataclass
class Rule:
    source: str
    targets: list[str]
    count: int | None = DEFAULT_COUNT  # the first n matches, in caption order; None: all

    def __post_init__(self):
        forms = sorted({self.source, _plural(self.source)}, key=len, reverse=True)
        words = "|".join(re.escape(f) for f in forms)
        # An optional article directly before the word, so that it can be made to agree with the new word.
        self.pattern = re.compile(r"(?:\b(an?)(\s+))?\b(" + words + r")\b", re.IGNORECASE)

    def apply(self, caption: str) -> list[str]:
        """One rewritten caption per target (its first ``count`` matches replaced); [] if the word is absent."""
        if not self.pattern.search(caption):
            return []
        out = []
        for target in self.targets:
            def swap(m, target=target):
                article, space, found = m.groups()
                plural = found.lower() != self.source.lower()
                new = _match_case(found, _plural(target) if plural else target)
                return (_agree(article, target, new) + space if article else "") + new

            out.append(self.pattern.sub(swap, caption, count=min(self.count or 0, sys.maxsize)))  # 0: all
        return out


def render(template: str, label: str) -> str:
    """``template`` with ``{label}`` filled in, an article directly before it made to agree (checked template)."""
    formatter = string.Formatter()
    out = ""
    for literal, name, spec, conversion in formatter.parse(template):
        out += literal
        if name is None:
            continue
        value = formatter.format_field(formatter.convert_field(label, conversion), spec or "")
        m = _ARTICLE_BEFORE.search(out)
        if m:
            out = out[: m.start()] + _agree(m.group(1), value, value) + m.group(2)
        out += value
    return out


@dataclass
class PromptSpec:
    rules: list[Rule] = field(default_factory=list)
    label_names: dict[str, str] = field(default_factory=dict)
    label_targets: list[str] | None = None
    template: str = DEFAULT_TEMPLATE
    table: dict[str, list[Edit]] | None = None

    @classmethod
    def default(cls) -> "PromptSpec":
        return cls.from_dict({"rules": DEFAULT_RULES})

    @classmethod
    def from_dict(cls, spec: dict, base: Path | None = None, source: str = "Prompt spec") -> "PromptSpec":
        """A checked spec; every problem is a ``ValueError`` naming ``source`` and the entry."""
        return _Checker(source).spec(spec, base)

    @classmethod
    def load(cls, path: str | Path | None) -> "PromptSpec":
        """The spec of a YAML/JSON prompts file or a pair table, checked whole; None: the default rules."""
        if path is None:
            return cls.default()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Prompts file {path} does not exist.")
        if path.suffix in TABLE_SUFFIXES:
            return cls(table=load_table(path))
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(f"Prompts file {path} is {size} bytes; at most {MAX_FILE_BYTES} are read "
                             f"(put many pairs in a table: Parquet, CSV or JSONL).")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"Prompts file {path} is not UTF-8 text (byte {e.start}).") from None
        spec = _parse_json(text, path) if path.suffix == ".json" else _parse_yaml(text, path)
        return cls.from_dict(spec, base=path.parent, source=f"Prompts file {path}")

    def edits(self, key: str, caption: str | None, label: str | None) -> list[Edit]:
        """The edits of one sample, in a stable order (its edit indices)."""
        if self.table is not None:
            return list(self.table.get(key, []))
        out: list[Edit] = []
        if caption:
            for rule in self.rules:
                out += [Edit(caption, t) for t in rule.apply(caption) if t != caption]
        if label not in (None, "") and self.label_names:
            name = self.label_names.get(str(label), str(label))
            source = caption or render(self.template, name)
            targets = self.label_targets or [n for n in self.label_names.values() if n != name]
            out += [Edit(source, render(self.template, t)) for t in targets if t != name]
        return list(dict.fromkeys(out))

    def skip_reason(self, key: str, caption: str | None, label: str | None) -> str:
        """Why ``edits(key, caption, label)`` is empty (the ``error`` of the skipped row); "" when it is not."""
        if self.edits(key, caption, label):
            return ""
        if self.table is not None:
            return NOT_IN_TABLE
        if not caption and label in (None, ""):
            return NO_CAPTION
        return NO_MATCH

    def digest(self) -> str:
        """sha256 (16 hex digits) of the loaded spec: rules, labels, template and every row of the table, so
        that a change to a table that a YAML file points to is a change of the prompts."""
        h = hashlib.sha256()
        rules = [[r.source, r.targets, "all" if r.count is None else r.count] for r in self.rules]
        head = {"version": PROMPTS_VERSION, "rules": rules,
                "names": list(self.label_names.items()), "targets": self.label_targets, "template": self.template,
                "table": self.table is not None}
        h.update(json.dumps(head, sort_keys=True, ensure_ascii=False).encode())
        for key in sorted(self.table or {}):  # the order of keys changes nothing; the order of a key's rows does
            for e in self.table[key]:
                h.update(b"\n" + json.dumps([key, e.source_prompt, e.target_prompt], ensure_ascii=False).encode())
        return h.hexdigest()[:16]


def _parse_json(text: str, path: Path):
    def no_duplicates(pairs):
        out = dict(pairs)
        if len(out) < len(pairs):
            seen = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise ValueError(f"key {_show(dup)} appears twice in one object")
        return out

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ValueError(f"Prompts file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
    except ValueError as e:  # a key given twice, a number of over 4300 digits
        raise ValueError(f"Prompts file {path} is refused: {e}.") from None
    except RecursionError:
        raise ValueError(f"Prompts file {path} is nested too deeply.") from None


def _parse_yaml(text: str, path: Path):
    import yaml

    class Loader(yaml.SafeLoader):  # not libyaml's CSafeLoader: deep nesting ([[[[...) overflows its C stack
        """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last silently)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    if (key_node.tag, key_node.value) in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key_node.value[:80]!r} appears twice in one mapping", key_node.start_mark)
                    seen.add((key_node.tag, key_node.value))
            return super().construct_mapping(node, deep)

    try:
        # Aliases become shared references, never copies: an alias "bomb" costs its size here, and nothing
        # below walks into a nested structure (non-strings are refused by type, never printed).
        return yaml.load(text, Loader=Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"Prompts file {path} is not valid YAML{where}: {e.problem or e.context}.") from None
    except yaml.YAMLError as e:
        raise ValueError(f"Prompts file {path} is not valid YAML: {e}.") from None
    except ValueError as e:  # a number of over 4300 digits
        raise ValueError(f"Prompts file {path} is refused: {e}.") from None
    except RecursionError:
        raise ValueError(f"Prompts file {path} is nested too deeply.") from None


def _show(value) -> str:
    """A short description of a value for an error message; never walks into a list or mapping."""
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"a mapping of {len(value)}"
    if isinstance(value, int) and value.bit_length() > 256:
        return f"a number of {value.bit_length()} bits"
    if isinstance(value, (str, int, float, bool)) or value is None:
        text = repr(value[:80] if isinstance(value, str) else value)
        return text if len(text) <= 80 else text[:77] + "..."
    return f"a {type(value).__name__}"


class _Checker:
    """Turns a parsed prompts file into a PromptSpec, refusing anything it would have to guess about."""

    def __init__(self, source: str):
        self.source = source
        self.entries = 0

    def fail(self, where: str, message: str):
        raise ValueError(f"{self.source}: {where}: {message}")

    def count(self, n: int):
        self.entries += n
        if self.entries > MAX_ENTRIES:
            raise ValueError(f"{self.source} has more than {MAX_ENTRIES} rules, targets and class names in all; "
                             f"put many pairs in a table (Parquet, CSV or JSONL).")

    def mapping(self, value, where: str, allowed: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"must be a mapping with {', '.join(allowed)}, got {_show(value)}.")
        unknown = [k for k in value if k not in allowed]
        if unknown:
            self.fail(where, f"unknown key {_show(unknown[0])}; expected {', '.join(allowed)}.")
        return value

    def text(self, value, where: str) -> str:
        if isinstance(value, bool) or isinstance(value, (int, float)):
            self.fail(where, f"{_show(value)} is not text; quote it ('...') if you mean the text.")
        if not isinstance(value, str):
            self.fail(where, f"must be text, got {_show(value)}.")
        if not value.strip():
            self.fail(where, "is empty.")
        if value != value.strip():
            self.fail(where, f"{_show(value)} has leading or trailing spaces.")
        return value

    def texts(self, value, where: str) -> list[str]:
        """A string is one text (`to: fox` is [fox]); a list is several; nothing else."""
        if isinstance(value, (str, int, float)):  # one value (a number is then refused with a hint)
            value = [value]
        if not isinstance(value, list):
            self.fail(where, f"must be text or a list of texts, got {_show(value)}.")
        if not value:
            self.fail(where, "is an empty list.")
        self.count(len(value))
        return [self.text(v, f"{where} entry {i}") for i, v in enumerate(value)]

    def spec(self, spec, base: Path | None) -> PromptSpec:
        if not isinstance(spec, dict):
            raise ValueError(f"{self.source} must hold a mapping with rules, labels or table, got {_show(spec)}.")
        unknown = [k for k in spec if k not in ("rules", "labels", "table")]
        if unknown:
            raise ValueError(f"{self.source}: unknown key {_show(unknown[0])}; expected rules, labels, table.")
        if "table" in spec and ("rules" in spec or "labels" in spec):
            raise ValueError(f"{self.source}: a `table` gives every edit; it cannot be combined with rules or labels.")
        out = PromptSpec()
        if "rules" in spec:
            out.rules = self.rules(spec["rules"])
        if "labels" in spec:
            self.labels(spec["labels"], out)
        if "table" in spec:
            name = self.text(spec["table"], "`table`")
            path = Path(name)
            path = path if path.is_absolute() or base is None else base / path
            if not path.is_file():
                self.fail("`table`", f"{path} does not exist.")
            out.table = load_table(path)
        if not out.rules and not out.label_names and out.table is None:
            raise ValueError(f"{self.source} gives no rules, labels or table: every sample would be skipped.")
        return out

    def rules(self, rules) -> list[Rule]:
        if not isinstance(rules, list):
            self.fail("`rules`", f"must be a list of rules (- from: ..., to: ...), got {_show(rules)}.")
        self.count(len(rules))
        out = []
        for i, r in enumerate(rules):
            where = f"rule {i}"
            self.mapping(r, where, ("from", "to", "count"))
            if "from" not in r or "to" not in r:
                self.fail(where, f"must have `from` and `to`, got keys {', '.join(map(_show, r)) or 'none'}.")
            out.append(Rule(self.text(r["from"], f"{where} `from`"), self.texts(r["to"], f"{where} `to`"),
                            self.rule_count(r.get("count", DEFAULT_COUNT), f"{where} `count`")))
        return out

    def rule_count(self, value, where: str) -> int | None:
        """A positive integer (the first n matches) or `all` (None); nothing else, not even True or 1.0."""
        if isinstance(value, str) and value == "all":
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.fail(where, f"must be a positive integer (the first n matches) or all, got {_show(value)}.")
        return value

    def labels(self, labels, out: PromptSpec):
        self.mapping(labels, "`labels`", ("names", "targets", "template"))
        names = labels.get("names")
        if isinstance(names, list):
            self.count(len(names))
            out.label_names = {str(i): self.text(n, f"`labels.names` entry {i}") for i, n in enumerate(names)}
        elif isinstance(names, dict):
            self.count(len(names))
            for k in names:
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    self.fail("`labels.names`", f"class id {_show(k)} must be an integer or text.")
            out.label_names = {str(k): self.text(n, f"`labels.names` entry {k}") for k, n in names.items()}
            if len(out.label_names) < len(names):
                self.fail("`labels.names`", "two class ids are the same once written as text (1 and '1').")
        else:
            self.fail("`labels.names`", f"must be a list of class names or a mapping class id -> name, got {_show(names)}.")
        if not out.label_names:
            self.fail("`labels.names`", "is empty.")
        if "targets" in labels:  # absent: every other class
            out.label_targets = self.texts(labels["targets"], "`labels.targets`")
        if "template" in labels:
            out.template = self.template(labels["template"])

    def template(self, template) -> str:
        where = "`labels.template`"
        if not isinstance(template, str):
            self.fail(where, f"must be text, got {_show(template)}.")
        shown = _show(template)
        try:
            fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                      if name is not None]
        except ValueError as e:
            self.fail(where, f"{shown} is not a valid template ({e}); write {{{{ and }}}} for literal braces.")
        for name, spec, conversion in fields:
            if name != "label" or conversion:
                field = name + (f"!{conversion}" if conversion else "")
                self.fail(where, f"{shown} has the field {{{field}}}; only {{label}} is allowed.")
            if "{" in spec:
                self.fail(where, f"{shown} has a nested field in a format spec; only {{label}} is allowed.")
        if not fields:
            self.fail(where, f"{shown} has no {{label}}: every class would get the same prompt.")
        try:
            render(template, "cat")
        except (ValueError, TypeError) as e:
            self.fail(where, f"{shown} cannot be filled in ({e}).")
        return template


def load_table(path: Path) -> dict[str, list[Edit]]:
    """key -> its edits, in the table's order; every column read as text (a key ``000001`` stays ``000001``)."""
    if path.suffix not in TABLE_SUFFIXES:
        raise ValueError(f"Pair table {path} must be .parquet, .csv or .jsonl.")
    rows = {".parquet": _parquet_rows, ".csv": _csv_rows, ".jsonl": _jsonl_rows}[path.suffix](path)
    table: dict[str, list[Edit]] = {}
    for where, key, src, tgt in rows:
        for column, value in zip(TABLE_COLUMNS, (key, src, tgt)):
            if not isinstance(value, str):
                raise ValueError(f"Pair table {path}, {where}: `{column}` must be text, got {_show(value)}.")
        if not key or not tgt.strip():
            raise ValueError(f"Pair table {path}, {where}: `{'key' if not key else 'target_prompt'}` is empty.")
        table.setdefault(key, []).append(Edit(src, tgt))  # a key given twice: several edits
    return table


def _csv_rows(path: Path):
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            _check_columns(path, reader.fieldnames or [])
            for row in reader:
                yield (f"line {reader.line_num}", *(row[c] for c in TABLE_COLUMNS))
        except (csv.Error, UnicodeDecodeError) as e:
            raise ValueError(f"Pair table {path} is not valid UTF-8 CSV near line {reader.line_num}: {e}.") from None


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"Pair table {path}: line {n} is not valid JSON ({e.msg}).") from None
                if not isinstance(row, dict):
                    raise ValueError(f"Pair table {path}: line {n} must be a JSON object, got {_show(row)}.")
                _check_columns(path, row, f" (line {n})")
                if not isinstance(row["key"], str):  # a number has lost its leading zeros already
                    raise ValueError(f"Pair table {path}: line {n}: `key` {_show(row['key'])} is not a string; "
                                     f"WebDataset keys are strings (000001 is not 1): write \"key\": \"...\".")
                yield (f"line {n}", *(row[c] for c in TABLE_COLUMNS))
        except UnicodeDecodeError:
            raise ValueError(f"Pair table {path} is not UTF-8 text.") from None


def _parquet_rows(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"Pair table {path} is not a readable Parquet file: {e}.") from None
    _check_columns(path, schema.names)
    for column in TABLE_COLUMNS:
        t = schema.field(column).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
            # Refused rather than converted: the number has lost what the key was (000001 and 1 are both 1).
            raise ValueError(f"Pair table {path}: column `{column}` holds numbers ({t}); WebDataset keys and "
                             f"prompts are strings (000001 is not 1): write the column as strings.")
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
            raise ValueError(f"Pair table {path}: column `{column}` must be strings, got {t}.")
    columns = pq.read_table(path, columns=list(TABLE_COLUMNS)).to_pydict()
    for i, row in enumerate(zip(*(columns[c] for c in TABLE_COLUMNS))):
        yield (f"row {i}", *row)


def _check_columns(path: Path, columns, where: str = ""):
    missing = [c for c in TABLE_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"Pair table {path}{where} lacks column(s) {', '.join(missing)}.")
