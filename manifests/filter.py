"""The ``--where`` filter of ``diffedit export``: a small expression language over the manifest's columns.

It is parsed here by a tokenizer and a recursive-descent parser and evaluated with ``pyarrow.compute``; no text
of a filter is ever given to ``eval``, ``compile``, ``DataFrame.query`` or ``pandas.eval``, so a filter can name
columns and literals and nothing else: no Python object, attribute, subscript or call is reachable.

Grammar, lowest precedence first (keywords and function names in any case; ``&``, ``|``, ``~`` are the spellings
of ``and``, ``or``, ``not``, with their precedence, as in pandas' ``query``)::

    filter     := or_expr
    or_expr    := and_expr (("or" | "|") and_expr)*
    and_expr   := not_expr (("and" | "&") not_expr)*
    not_expr   := ("not" | "~") not_expr | comparison
    comparison := sum [ (("==" | "!=" | "<" | "<=" | ">" | ">=") sum)+     chained: a < b < c is a < b and b < c
                      | "is" ["not"] "null"
                      | ["not"] "in" list ]
    sum        := product (("+" | "-") product)*
    product    := unary (("*" | "/") unary)*
    unary      := "-" unary | primary
    primary    := NUMBER | STRING | "true" | "false" | column | "(" or_expr ")"
                | ("isnull" | "notnull" | "isna" | "notna") "(" or_expr ")"
    list       := ("[" | "(") literal ("," literal)* [","] ("]" | ")")
    literal    := ["-"] NUMBER | STRING | "true" | "false"
    column     := NAME (a column of the manifest) | `any name in backquotes`
    NUMBER     := 12, 0.5, .5, 1e-3 (an integer is an exact int64)      STRING := 'text' or "text" (\\ escapes \\ ' ")

Types are checked before anything is evaluated: the filter must be boolean (``best``, a comparison,
``isnull(col)``, ...); ``and``/``or``/``not`` take booleans; arithmetic and ``<``... take numbers (``<``... also
strings); ``==``/``!=`` compare two values of one kind. Binary and list columns (``mask_png``, ``latents``) only go
into ``isnull``/``notnull``/``is null``. ``/`` divides as floats.

Nulls are SQL's: a comparison or arithmetic with a null is null, ``not null`` is null, ``null and false`` is false,
``null or true`` is true, and a row is kept only where the filter is true. So ``clip_image < 0.7`` and
``not (clip_image < 0.7)`` both drop the rows without a ``clip_image``; ask for them with ``isnull(clip_image)``.
NaN in a float column and division by zero count as null. ``x == null`` is refused: write ``x is null``.
Integers are exact int64 (``seed == 5712254869864443259``); a number meeting a float column takes its type, as
in NumPy (``clip_target <= 0.15`` compares in float32 and keeps a stored 0.15).

Bounds: at most ``MAX_LENGTH`` characters and ``MAX_DEPTH`` levels of nesting (parentheses, ``not``, ``-``, and
chains of binary operators), so a hostile filter is one ``FilterError``, never a ``RecursionError``.

    expr = parse("clip_directional >= 0.2 and (best or isnull(best))", table.schema)
    table = table.filter(pa.array(expr.mask(table)))
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from functools import reduce

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

MAX_LENGTH = 10_000  # characters
MAX_DEPTH = 32  # levels; the parser takes up to 12 Python frames a level, well inside the default limit of 1000

KEYWORDS = {"and", "or", "not", "in", "is", "true", "false", "null"}
FUNCTIONS = {"isnull": False, "isna": False, "notnull": True, "notna": True}  # name -> negated
COMPARISONS = {"==": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal, ">": pc.greater,
               ">=": pc.greater_equal}
KIND_NAMES = {"bool": "a boolean", "num": "a number", "str": "a string", "data": "binary or list data"}

TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<num>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
      | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<qname>`[^`]+`)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<op>==|!=|<=|>=|<|>|\+|-|\*|/|\(|\)|\[|\]|,|&|\||~)""",
    re.VERBOSE | re.ASCII | re.DOTALL,
)
HINTS = {  # characters a Python or pandas user may try, and why they are refused
    ".": "attribute access is not part of the filter language",
    "@": "`@name` (a pandas local variable) is not part of the filter language",
    "=": "`=` is not a comparison: write `==`",
    "!": "write `not` (or `!=` for a comparison)",
    "'": "this string has no closing quote",
    '"': "this string has no closing quote",
    "`": "this backquoted name has no closing backquote",
}


class FilterError(ValueError):
    """An invalid filter; the message is one line and names the character where the problem is."""

    def __init__(self, problem: str, text: str = "", position: int | None = None):
        self.problem, self.position = problem, position
        if position is None:
            super().__init__(problem)
        elif position >= len(text):
            super().__init__(f"at the end of the filter: {problem}")
        else:
            here = text[position:position + 24] + ("..." if len(text) > position + 24 else "")
            super().__init__(f"at character {position + 1} ({here!r}): {problem}")


# -- the tree ----------------------------------------------------------------------------------------
# Each node has its kind ("bool", "num", "str" or "data"), the position of its text, and its depth, and
# evaluates to a pyarrow Array or Scalar over a table.


class Node:
    kind: str

    def __init__(self, pos: int, *children: Node):
        self.pos, self.children = pos, children
        self.depth = 1 + max((c.depth for c in children), default=0)

    def columns(self) -> set[str]:
        return set().union(*(c.columns() for c in self.children))


class Column(Node):
    def __init__(self, pos, name, kind):
        super().__init__(pos)
        self.name, self.kind = name, kind

    def columns(self):
        return {self.name}

    def eval(self, table):
        values = table.column(self.name)
        if pa.types.is_floating(values.type):  # NaN counts as null
            values = pc.if_else(pc.is_nan(values), pa.scalar(None, values.type), values)
        return values


class Literal(Node):
    def __init__(self, pos, value):
        super().__init__(pos)
        self.value = value
        self.kind = {bool: "bool", int: "num", float: "num", str: "str"}[type(value)]

    def eval(self, table):
        return pa.scalar(self.value, pa.int64() if type(self.value) is int else None)


class Negate(Node):
    kind = "num"

    def eval(self, table):
        return pc.negate_checked(self.children[0].eval(table))


class Not(Node):
    kind = "bool"

    def eval(self, table):
        return pc.invert(self.children[0].eval(table))


class Operator(Node):
    """A node of an operator (``op``: its spelling) over its operands."""

    def __init__(self, pos, op, *operands):
        super().__init__(pos, *operands)
        self.op = op


class Arithmetic(Operator):
    kind = "num"

    def eval(self, table):
        a, b = _operands(self.children, table)
        if self.op == "/":
            a, b = pc.cast(a, pa.float64()), pc.cast(b, pa.float64())
            return pc.divide(a, pc.if_else(pc.equal(b, 0.0), pa.scalar(None, pa.float64()), b))
        return {"+": pc.add_checked, "-": pc.subtract_checked, "*": pc.multiply_checked}[self.op](a, b)


class Compare(Operator):
    kind = "bool"

    def eval(self, table):
        return COMPARISONS[self.op](*_operands(self.children, table))


class Logical(Operator):
    """``and``/``or`` over any number of operands (a flat list, so a long chain is not a deep tree)."""

    kind = "bool"

    def eval(self, table):
        combine = pc.and_kleene if self.op == "and" else pc.or_kleene
        return reduce(combine, (c.eval(table) for c in self.children))


class IsNull(Node):
    kind = "bool"

    def __init__(self, pos, operand, negated):
        super().__init__(pos, operand)
        self.negated = negated

    def eval(self, table):
        values = self.children[0].eval(table)
        return (pc.is_valid if self.negated else pc.is_null)(values)


class InList(Node):
    """``x in [a, b]`` is ``x == a or x == b`` (so a null ``x`` gives null); ``not in`` is its negation."""

    kind = "bool"

    def __init__(self, pos, operand, values, negated):
        super().__init__(pos, operand, *values)
        self.negated = negated

    def eval(self, table):
        x = self.children[0]
        found = reduce(pc.or_kleene, (pc.equal(*_operands((x, v), table)) for v in self.children[1:]))
        return pc.invert(found) if self.negated else found


def _operands(nodes, table):
    """Evaluate two operands. A number literal takes the type of a float operand it meets, as in NumPy:
    ``clip_target <= 0.15`` compares in float32, so it keeps a stored 0.15 (0.15000000596 as a float64)."""
    a, b = (n.eval(table) for n in nodes)
    if isinstance(nodes[0], Literal) and nodes[0].kind == "num" and pa.types.is_floating(b.type):
        a = pc.cast(a, b.type, safe=False)
    if isinstance(nodes[1], Literal) and nodes[1].kind == "num" and pa.types.is_floating(a.type):
        b = pc.cast(b, a.type, safe=False)
    if pa.types.is_floating(a.type) != pa.types.is_floating(b.type) or {a.type, b.type} == {pa.float32(), pa.float64()}:
        # Two columns of other kinds (mask_fraction < seed): compare in float64, which holds both (Arrow would
        # cast the int64 into the float32 range and fail on the data).
        a, b = pc.cast(a, pa.float64(), safe=False), pc.cast(b, pa.float64(), safe=False)
    return a, b


class Expr:
    """A parsed, type-checked filter: ``mask(data)`` evaluates it over a pyarrow Table or a pandas DataFrame."""

    def __init__(self, text: str, root: Node):
        self.text, self.root = text, root
        self.columns = root.columns()

    def __repr__(self):
        return f"Expr({self.text!r})"

    def mask(self, data: pa.Table | pa.RecordBatch | pd.DataFrame) -> pd.Series:
        """A bool Series, one value per row (index: the DataFrame's, or 0..n-1): True where the filter is true."""
        index = data.index if isinstance(data, pd.DataFrame) else pd.RangeIndex(data.num_rows)
        missing = sorted(self.columns - set(data.columns if isinstance(data, pd.DataFrame) else data.schema.names))
        if missing:
            raise FilterError(f"the data has no column {', '.join(missing)}")
        if isinstance(data, pd.DataFrame):
            data = pa.Table.from_pandas(data[sorted(self.columns)], preserve_index=False)
        try:
            result = self.root.eval(data)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise FilterError(f"cannot evaluate the filter {self.text!r}: {str(exc).splitlines()[0]}") from exc
        if isinstance(result, pa.Scalar):  # a filter without columns: true or false for every row
            return pd.Series(result.is_valid and bool(result.as_py()), index=index, dtype=bool)
        return pd.Series(pc.fill_null(result, False).to_numpy(zero_copy_only=False), index=index, dtype=bool)


# -- tokens and the parser ---------------------------------------------------------------------------------


def tokenize(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, position) for each token, ending with ("end", "", len(text))."""
    tokens, pos = [], 0
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if m is None:
            char = text[pos]
            raise FilterError(HINTS.get(char, f"unexpected character {char!r}"), text, pos)
        if m.lastgroup != "space":
            tokens.append((m.lastgroup, m.group(), pos))
        pos = m.end()
        if m.lastgroup == "num" and pos < len(text) and (text[pos].isalnum() or text[pos] in "_."):
            raise FilterError(f"not a number: {m.group() + text[pos]!r}...", text, m.start())
    tokens.append(("end", "", len(text)))
    return tokens


def _schema_kinds(columns) -> dict[str, str]:
    if isinstance(columns, pd.DataFrame):
        columns = pa.Schema.from_pandas(columns, preserve_index=False)
    if isinstance(columns, pa.Schema):
        columns = {f.name: f.type for f in columns}
    if not isinstance(columns, Mapping):
        raise TypeError(f"columns must be a pyarrow Schema, a DataFrame or a mapping name -> pyarrow type, "
                        f"not {type(columns).__name__}")
    kinds = {}
    for name, t in columns.items():
        if pa.types.is_boolean(t):
            kinds[name] = "bool"
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
            kinds[name] = "num"
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            kinds[name] = "str"
        else:
            kinds[name] = "data"
    return kinds


def parse(text: str, columns: pa.Schema | pd.DataFrame | Mapping[str, pa.DataType]) -> Expr:
    """Parse and type-check ``text`` against ``columns`` (names and pyarrow types); raise ``FilterError``."""
    if not isinstance(text, str):
        raise FilterError(f"a filter is a string, not {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise FilterError(f"the filter is {len(text)} characters long; at most {MAX_LENGTH} are allowed")
    if not text.strip():
        raise FilterError("the filter is empty")
    root = _Parser(text, _schema_kinds(columns)).parse()
    if root.kind != "bool":
        raise FilterError(f"a filter must be a boolean expression (a comparison, a boolean column such as `best`, "
                          f"isnull(col), ...), and this one is {KIND_NAMES[root.kind]}", text, root.pos)
    return Expr(text, root)


class _Parser:
    def __init__(self, text: str, kinds: dict[str, str]):
        self.text, self.kinds = text, kinds
        self.tokens = tokenize(text)
        self.i = 0
        self.nesting = 0

    # -- helpers
    def peek(self, ahead: int = 0) -> tuple[str, str, int]:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def next(self) -> tuple[str, str, int]:
        token = self.peek()
        self.i += 1
        return token

    def at(self, *words: str, ahead: int = 0) -> bool:
        """Whether the token is one of ``words`` (operators, or keywords in any case)."""
        kind, value, _ = self.peek(ahead)
        return (kind == "op" and value in words) or (kind == "name" and value.lower() in words)

    def fail(self, problem: str, pos: int | None = None):
        raise FilterError(problem, self.text, self.peek()[2] if pos is None else pos)

    def unexpected(self):
        kind, value, pos = self.peek()
        if kind == "end":
            self.fail("the filter ends too early")
        if value == "[":
            self.fail("`[` starts a list only after `in`; subscripts are not part of the filter language")
        self.fail(f"unexpected {value!r}")

    def expect(self, *words: str) -> None:
        if not self.at(*words):
            kind, value, _ = self.peek()
            found = "the end of the filter" if kind == "end" else repr(value)
            self.fail(f"expected {' or '.join(repr(w) for w in words)}, found {found}")
        self.next()

    def node(self, cls, pos, *args):
        made = cls(pos, *args)
        if made.depth > MAX_DEPTH:
            self.fail(f"the filter nests deeper than {MAX_DEPTH} levels", pos)
        return made

    def deeper(self, pos: int) -> None:
        self.nesting += 1
        if self.nesting > MAX_DEPTH:
            self.fail(f"the filter nests deeper than {MAX_DEPTH} levels", pos)

    def check(self, node: Node, *kinds: str, what: str) -> Node:
        if node.kind not in kinds:
            if node.kind == "data":
                self.fail(f"{what} cannot take binary or list data; only isnull, notnull and `is null` can", node.pos)
            wanted = " or ".join(KIND_NAMES[k] for k in kinds)
            self.fail(f"{what} takes {wanted}, and this is {KIND_NAMES[node.kind]}", node.pos)
        return node

    # -- the grammar (see the module docstring)
    def parse(self) -> Node:
        root = self.or_expr()
        if self.peek()[0] != "end":
            self.unexpected()
        return root

    def or_expr(self) -> Node:
        return self.logical("or", "|", self.and_expr)

    def and_expr(self) -> Node:
        return self.logical("and", "&", self.not_expr)

    def logical(self, word, symbol, operand) -> Node:
        first = operand()
        operands = [first]
        while self.at(word, symbol):
            self.next()
            operands.append(operand())
        if len(operands) == 1:
            return first
        for o in operands:
            self.check(o, "bool", what=f"`{word}`")
        return self.node(Logical, first.pos, word, *operands)

    def not_expr(self) -> Node:
        if self.at("not", "~"):
            return self.prefix(Not, self.not_expr, "bool", what="`not`")
        return self.comparison()

    def prefix(self, cls, operand, kind: str, what: str) -> Node:
        """A prefix operator (``not``, ``-``) over ``operand()``, which nests one level deeper."""
        pos = self.next()[2]
        self.deeper(pos)
        inner = self.check(operand(), kind, what=what)
        self.nesting -= 1
        return self.node(cls, pos, inner)

    def comparison(self) -> Node:
        left = self.sum()
        if self.at(*COMPARISONS):
            terms, ops = [left], []
            while self.at(*COMPARISONS):
                ops.append(self.next()[1])
                if self.at("null"):
                    self.fail("a comparison with null is never true: write `x is null` or `x is not null`")
                terms.append(self.sum())
            compares = [self.compare(op, a, b) for op, a, b in zip(ops, terms, terms[1:])]
            return compares[0] if len(compares) == 1 else self.node(Logical, left.pos, "and", *compares)
        if self.at("is"):
            self.next()
            negated = self.at("not")
            if negated:
                self.next()
            self.expect("null")
            return self.node(IsNull, left.pos, left, negated)
        if self.at("in") or (self.at("not") and self.at("in", ahead=1)):
            negated = self.next()[1].lower() == "not"
            if negated:
                self.next()
            values = self.list_of_literals()
            for v in values:
                self.compare("==", left, v, what="`in`")
            return self.node(InList, left.pos, left, values, negated)
        return left

    def compare(self, op, left, right, what=None) -> Node:
        what = what or f"`{op}`"
        self.check(left, "bool", "num", "str", what=what)
        self.check(right, "bool", "num", "str", what=what)
        if op not in ("==", "!=") and left.kind == "bool":
            self.fail(f"{what} orders numbers and strings, not booleans", left.pos)
        if left.kind != right.kind:
            self.fail(f"{what} cannot compare {KIND_NAMES[left.kind]} with {KIND_NAMES[right.kind]}", right.pos)
        return self.node(Compare, left.pos, op, left, right)

    def list_of_literals(self) -> list[Node]:
        if not self.at("[", "("):
            self.fail("`in` takes a list of literals, such as [1, 2] or ['a.tar', 'b.tar']")
        end = {"[": "]", "(": ")"}[self.next()[1]]
        if self.at(end):
            self.fail("an `in` list needs at least one value")
        values = [self.literal()]
        while self.at(","):
            self.next()
            if self.at(end):  # a trailing comma
                break
            values.append(self.literal())
        self.expect(end)
        return values

    def literal(self) -> Node:
        kind, value, pos = self.peek()
        if kind in ("num", "str") or self.at("true", "false") or (value == "-" and self.peek(1)[0] == "num"):
            return self.unary()
        self.fail("a list after `in` holds literals only (numbers, strings, true, false)")

    def sum(self) -> Node:
        return self.arithmetic(("+", "-"), self.product)

    def product(self) -> Node:
        return self.arithmetic(("*", "/"), self.unary)

    def arithmetic(self, ops, operand) -> Node:
        left = operand()
        while self.at(*ops):
            op = self.next()[1]
            right = operand()
            self.check(left, "num", what=f"`{op}`")
            self.check(right, "num", what=f"`{op}`")
            left = self.node(Arithmetic, left.pos, op, left, right)
        return left

    def unary(self) -> Node:
        if self.at("-") and self.peek(1)[0] == "num":  # a negative literal: -9223372036854775808 is an int64
            pos = self.next()[2]
            return self.node(Literal, pos, self.number(self.next()[1], pos, negative=True))
        if self.at("-"):
            return self.prefix(Negate, self.unary, "num", what="`-`")
        return self.primary()

    def primary(self) -> Node:
        kind, value, pos = self.peek()
        if kind == "num":
            self.next()
            return self.node(Literal, pos, self.number(value, pos))
        if kind == "str":
            self.next()
            return self.node(Literal, pos, self.string(value, pos))
        if kind == "qname":
            self.next()
            return self.column(value[1:-1], pos)
        if self.at("("):
            self.next()
            self.deeper(pos)
            inner = self.or_expr()
            self.expect(")")
            self.nesting -= 1
            return inner
        if kind == "name":
            word = value.lower()
            if word in ("true", "false"):
                self.next()
                return self.node(Literal, pos, word == "true")
            if word == "null":
                self.fail("null is only written in `x is null` and `x is not null`")
            if word in KEYWORDS:
                self.fail(f"expected a value, found the keyword {value!r} (backquote a column of that name)")
            if self.at("(", ahead=1):
                return self.call(value, pos)
            self.next()
            return self.column(value, pos)
        self.unexpected()

    def call(self, name, pos) -> Node:
        if name.lower() not in FUNCTIONS:
            self.fail(f"unknown function {name!r}: the filter knows isnull(x) and notnull(x) (also isna, notna)")
        self.next()
        self.next()  # "("
        self.deeper(pos)
        operand = self.or_expr()
        self.expect(")")
        self.nesting -= 1
        return self.node(IsNull, pos, operand, FUNCTIONS[name.lower()])

    def column(self, name, pos) -> Node:
        if name not in self.kinds:
            self.fail(f"unknown column {name!r}; the columns are: {', '.join(self.kinds)}", pos)
        return self.node(Column, pos, name, self.kinds[name])

    def number(self, text, pos, negative=False) -> int | float:
        if any(c in text for c in ".eE"):
            number = float(text)
            if not math.isfinite(number):
                self.fail(f"{text} is out of the range of a float", pos)
        else:
            number = int(text)
            if not -(2**63) <= (-number if negative else number) < 2**63:
                self.fail(f"{'-' if negative else ''}{text} is out of the range of a 64-bit integer", pos)
        return -number if negative else number

    def string(self, value, pos) -> str:
        body = value[1:-1]
        bad = re.search(r"\\[^\\'\"]", body)
        if bad:
            self.fail(f"unknown escape {bad.group()!r} in a string: only \\\\, \\' and \\\" are escapes",
                      pos + 1 + bad.start())
        return re.sub(r"\\(.)", r"\1", body, flags=re.DOTALL)
