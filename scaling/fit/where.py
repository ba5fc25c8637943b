"""``--where`` row filters, parsed and evaluated here: never by ``eval`` or ``DataFrame.query``.

pandas' ``query`` evaluates Python (``@`` names, attribute chains such as ``__globals__``), so a
filter string could run code. This module accepts only

- column names (``N``, ``loss``; a name with other characters in backticks: `` `N params` ``),
- constants: numbers, quoted strings, ``True``/``False``/``None``/``nan``, and lists or tuples
  of them (for ``in``),
- comparisons ``== != < <= > >=`` (chains like ``1e9 <= C < 1e12`` too), ``in``, ``not in``,
- ``and``, ``or``, ``not`` (and their pandas spellings ``&``, ``|``, ``~``), parentheses,
  unary minus on a number,

and raises ``UsageError`` ("--where: ...", one line) for anything else. The expression is read
with Python's own parser (``ast.parse``, which runs nothing) and evaluated node by node on the
DataFrame's columns.
"""

from __future__ import annotations

import ast
import math
import operator
import re

import numpy as np
import pandas as pd

from scaling.errors import UsageError

_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_NAMED_CONSTANTS = {"True": True, "False": False, "None": None, "nan": math.nan, "inf": math.inf}
_BACKTICK = re.compile(r"`([^`]*)`")


def _fail(expr: str, why: str):
    raise UsageError(f"--where: {why} in {expr!r}; use columns, constants, comparisons, in, and/or/not")


def _parse(expr: str) -> tuple[ast.AST, dict[str, str]]:
    quoted: dict[str, str] = {}

    def sub(m: re.Match) -> str:
        key = f"__col{len(quoted)}__"
        quoted[key] = m.group(1)
        return key

    text = _BACKTICK.sub(sub, expr)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        _fail(expr, f"cannot parse ({err.msg})")
    return tree.body, quoted


class _Eval:
    def __init__(self, df: pd.DataFrame, expr: str, quoted: dict[str, str]):
        self.df, self.expr, self.quoted = df, expr, quoted

    def mask(self, node: ast.AST) -> pd.Series:
        v = self.value(node)
        if not isinstance(v, pd.Series):
            _fail(self.expr, "the filter must compare a column")
        if not pd.api.types.is_bool_dtype(v.dtype):
            _fail(self.expr, "the filter must be a comparison, not a bare value")
        return _as_mask(v, self.df.index)

    def value(self, node: ast.AST):
        if isinstance(node, ast.BoolOp):
            parts = [self.mask(v) for v in node.values]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(node.op, ast.And) else (out | p)
            return out
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
            a, b = self.mask(node.left), self.mask(node.right)
            return (a & b) if isinstance(node.op, ast.BitAnd) else (a | b)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, (ast.Not, ast.Invert)):
                return ~self.mask(node.operand)
            if isinstance(node.op, (ast.USub, ast.UAdd)):
                v = self.constant(node.operand)
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    _fail(self.expr, "a sign applies to numbers only")
                return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Name):
            return self.column(node.id)
        return self.constant(node)

    def column(self, name: str) -> pd.Series:
        if name in _NAMED_CONSTANTS:
            return _NAMED_CONSTANTS[name]
        col = self.quoted.get(name, name)
        if col not in self.df.columns:
            have = ", ".join(map(str, self.df.columns))
            raise UsageError(f"--where: unknown column {col!r} in {self.expr!r} (have: {have})")
        return self.df[col]

    def constant(self, node: ast.AST):
        if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, int, float, str))):
            return node.value
        if isinstance(node, ast.Name) and node.id in _NAMED_CONSTANTS:
            return _NAMED_CONSTANTS[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return self.value(node)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self.constant(e) for e in node.elts]
        _fail(self.expr, f"{type(node).__name__.lower()} is not allowed")

    def compare(self, node: ast.Compare) -> pd.Series:
        out = None
        left = self.value(node.left)
        for op, right_node in zip(node.ops, node.comparators):
            right = self.value(right_node)
            if isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(left, pd.Series) or not isinstance(right, list):
                    _fail(self.expr, "'in' needs a column on the left and a list on the right")
                m = _as_mask(left.isin(right), self.df.index)
                if any(isinstance(x, float) and math.isnan(x) for x in right):
                    m = m | left.isna()
                m = ~m if isinstance(op, ast.NotIn) else m
            elif type(op) in _COMPARE:
                if not isinstance(left, pd.Series) and not isinstance(right, pd.Series):
                    _fail(self.expr, "a comparison needs a column")
                if isinstance(left, list) or isinstance(right, list):
                    _fail(self.expr, "a list can only follow 'in'")
                try:
                    m = _as_mask(_COMPARE[type(op)](left, right), self.df.index)
                except (TypeError, ValueError) as err:
                    raise UsageError(f"--where: cannot compare in {self.expr!r} ({str(err).splitlines()[0]})") from None
            else:
                _fail(self.expr, f"operator {type(op).__name__} is not allowed")
            out = m if out is None else (out & m)
            left = right
        return out


MAX_DEPTH = 64  # nesting deeper than any real filter: refused before it can exhaust the stack


def _as_mask(m, index) -> pd.Series:
    """A plain bool Series (missing values of nullable columns count as False)."""
    if isinstance(m, pd.Series):
        return m.astype("boolean").fillna(False).astype(bool)
    return pd.Series(np.asarray(m, dtype=bool), index=index)


def _depth(node: ast.AST) -> int:
    return 1 + max((_depth(c) for c in ast.iter_child_nodes(node)), default=0)


def row_mask(df: pd.DataFrame, expr: str) -> pd.Series:
    """Boolean Series over ``df``'s rows for the filter ``expr`` (see the module docstring)."""
    if not isinstance(expr, str) or len(expr) > 10_000:
        raise UsageError("--where: give a filter string of at most 10,000 characters")
    try:
        node, quoted = _parse(expr)
        if _depth(node) > MAX_DEPTH:
            _fail(expr, f"nesting deeper than {MAX_DEPTH} levels")
        return _Eval(df, expr, quoted).mask(node)
    except UsageError:
        raise
    except (RecursionError, MemoryError, ValueError, TypeError, UnicodeError) as err:
        raise UsageError(f"--where: cannot evaluate {expr[:200]!r} ({type(err).__name__})") from None


def apply(df: pd.DataFrame, expr: str) -> pd.DataFrame:
    """The rows of ``df`` that ``expr`` keeps."""
    return df[row_mask(df, expr)]
