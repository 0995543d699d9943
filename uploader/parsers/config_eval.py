"""The top-level values of a dumped OpenMMLab config, read off its syntax tree; the config is never executed.

`MMDetWandbHook` imported the dumped module and copied its top-level variables into `wandb.config`. A dump
(mmcv's and mmengine's `Config.pretty_text`) is `name = value` lines whose values are literals, `dict(k=v)`,
`{'k': v}`, lists, tuples, negative numbers and `range(a, b)`: that grammar is evaluated, nothing else.
Any other line is code the sidecar does not run; since code can change any name, the names bound before it
are reported as skipped, with the line that made them unknown.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

MAX_RANGE = 1_000_000  # `range(n)` becomes a list in W&B's config: bounded, so that a file cannot exhaust memory

# Nodes through which an expression may run code (and so change names other than its target).
_RUNS_CODE = (ast.Call, ast.NamedExpr, ast.Lambda, ast.comprehension, ast.Await, ast.Yield, ast.YieldFrom)


class ConfigParseError(ValueError):
    """The config text is not valid Python, so none of it can be trusted."""

    def __init__(self, filename: str, lineno: int | None, message: str) -> None:
        super().__init__(f"{filename}, line {lineno}: {message}" if lineno else f"{filename}: {message}")
        self.filename = filename
        self.lineno = lineno


@dataclass(frozen=True)
class ConfigDump:
    """Top-level variables that could be evaluated (JSON-shaped, in file order) and why the others could not."""

    values: dict[str, Any]
    skipped: dict[str, str]


class _Unsupported(Exception):
    """An expression outside the dump grammar."""


@dataclass(frozen=True)
class _Skip:
    """A name Python would have bound, whose value we do not know, and why."""

    reason: str


def evaluate_config(source: str, filename: str = "<config>") -> ConfigDump:
    """Evaluate a dump's top-level variables from its syntax tree alone; never exec/eval/import.

    Names starting with `_` are not reported. Raises ConfigParseError (with filename and line) when the source
    is not valid Python.
    """
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        raise ConfigParseError(filename, exc.lineno, exc.msg) from exc
    except (ValueError, RecursionError) as exc:  # a NUL byte; nesting too deep for Python's own compiler
        raise ConfigParseError(filename, None, str(exc)) from exc
    bindings: dict[str, Any] = {}  # insertion order is the order of Python's module dict
    builtins = True  # `dict` and `range` are still Python's own
    for stmt in tree.body:
        builtins = _run(stmt, bindings, builtins and not bindings.keys() & {"dict", "range"})
    public = {k: v for k, v in bindings.items() if not k.startswith("_")}
    return ConfigDump(
        values={k: v for k, v in public.items() if not isinstance(v, _Skip)},
        skipped={k: v.reason for k, v in public.items() if isinstance(v, _Skip)},
    )


def _run(stmt: ast.stmt, bindings: dict[str, Any], builtins: bool) -> bool:
    """Bind what one statement binds; False once code ran that may have shadowed `dict` or `range` unseen."""
    target = _dump_target(stmt)
    if target is not None:
        try:
            bindings[target] = _value(stmt.value, builtins)  # type: ignore[attr-defined]
            return builtins
        except _Unsupported as exc:
            reason = str(exc)
        except RecursionError:
            reason = f"line {stmt.lineno}: expression is nested too deeply"
        if not _runs_code(stmt, bindings, builtins):
            bindings[target] = _Skip(reason)
            return builtins
    changed = f"line {stmt.lineno}: may be changed by `{_snippet(stmt)}`, which is not evaluated"
    for name in bindings:
        bindings[name] = _Skip(changed)
    for name in _bound_names(stmt):
        bindings[name] = _Skip(f"line {stmt.lineno}: set by `{_snippet(stmt)}`, which is not evaluated")
    if target is not None:
        bindings[target] = _Skip(reason)
    named = isinstance(stmt, (ast.Import, ast.ImportFrom)) and all(a.name != "*" for a in stmt.names)
    return builtins and named  # an import binds only what it names


def _dump_target(stmt: ast.stmt) -> str | None:
    """The name of a `name = value` line; None for any other statement."""
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    return None


def _runs_code(stmt: ast.stmt, bindings: dict[str, Any], builtins: bool) -> bool:
    """Whether evaluating the statement could call code: a call other than Python's own `dict` and `range`, or
    any use of an unknown object (its operators and attributes may be code)."""
    return any(
        isinstance(n, _RUNS_CODE) and not (builtins and _builtin_call(n))
        or isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and isinstance(bindings.get(n.id), _Skip)
        for n in ast.walk(stmt)
    )


def _builtin_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("dict", "range")


def _bound_names(stmt: ast.stmt) -> list[str]:
    """Top-level names a statement we do not run would bind (function and class bodies have their own scope)."""
    names: list[str] = []
    stack: list[ast.AST] = [stmt]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.extend((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.append(node.id)
        elif not isinstance(node, (ast.Lambda, ast.comprehension)):
            stack.extend(ast.iter_child_nodes(node))
    return names


def _snippet(node: ast.AST) -> str:
    """The start of the offending source, to make a skip reason actionable."""
    try:
        text = (ast.unparse(node).splitlines() or [""])[0]
    except RecursionError:
        return type(node).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _unsupported(node: ast.AST, why: str) -> _Unsupported:
    return _Unsupported(f"line {getattr(node, 'lineno', '?')}: `{_snippet(node)}` is not evaluated ({why})")


def _value(node: ast.expr, builtins: bool) -> Any:
    """A value of the dump grammar, JSON-shaped as W&B stores it (tuples and ranges become lists)."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float))):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e, builtins) for e in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return _dict({_key(k, builtins): v for k, v in zip(node.keys, node.values)}, builtins)  # type: ignore[arg-type]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        operand = _value(node.operand, builtins)
        if isinstance(operand, (int, float)) and not isinstance(operand, bool):
            return -operand
        raise _unsupported(node, "negation of a non-number")
    if _builtin_call(node):
        if not builtins:
            raise _unsupported(node, f"`{node.func.id}` may not be Python's own here")
        return _dict_call(node) if node.func.id == "dict" else _range(node)  # type: ignore[attr-defined]
    raise _unsupported(node, "not a literal")


def _key(node: ast.expr, builtins: bool) -> Any:
    key = _value(node, builtins)
    if isinstance(key, list):
        raise _unsupported(node, "unhashable dict key")
    return key


def _dict(items: dict[Any, ast.expr], builtins: bool) -> dict[Any, Any]:
    return {key: _value(value, builtins) for key, value in items.items()}


def _dict_call(node: ast.Call) -> dict[str, Any]:
    if node.args or any(k.arg is None for k in node.keywords):
        raise _unsupported(node, "dict() with other than keyword arguments")
    if len({k.arg for k in node.keywords}) < len(node.keywords):
        raise _unsupported(node, "repeated keyword")  # a TypeError in Python
    return _dict({k.arg: k.value for k in node.keywords}, True)


def _range(node: ast.Call) -> list[int]:
    args = [_value(a, True) for a in node.args]
    if node.keywords or not 1 <= len(args) <= 3 or not all(type(a) is int for a in args) or 0 in args[2:]:
        raise _unsupported(node, "range() of other than one to three integers")
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise _unsupported(node, "range too long")
    return list(numbers)
