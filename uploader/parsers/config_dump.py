"""The training config of a run (`RunConfig`): where it is found, how it is read, what the sidecar takes from it.

This module owns everything about dumped OpenMMLab configs: finding a run's config (`for_log`: mmdet 2.x
`work_dir/<exp_name>` or the `config` string of the first `.log.json` line; mmengine `<ts>/vis_data/config.py`),
evaluating it (`evaluate_config`), and the settings read off it (runner type, momentum, intervals, the W&B
hook's options). `MMDetWandbHook` imported the dumped module and copied its top-level variables into
`wandb.config`. The sidecar must reproduce those values without torch/mmcv and without executing user code,
so it walks the syntax tree and evaluates only literal-like expressions; whatever would need real execution
is reported per variable instead.
"""
from __future__ import annotations

import ast
import copy
import json
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.numbers import as_int, is_number
from common.records import LogFormat
from uploader.discovery import FoundLog
from uploader.tail import read_head

MAX_CONFIG_BYTES = 16 << 20
# What torch puts into param_groups when a config leaves momentum/betas out; the hook logged these values.
TORCH_DEFAULT_MOMENTUM = {"SGD": 0.0, "Adam": 0.9, "AdamW": 0.9, "Adamax": 0.9, "NAdam": 0.9, "RAdam": 0.9}

# Guards so that a hostile or degenerate file cannot exhaust memory or time while being "evaluated".
_MAX_INT_BITS = 4096
_MAX_COST = 1_000_000  # containers + elements + string characters of one variable's value
_MAX_DEPTH = 100

_ARITHMETIC: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CONVERSIONS: dict[int, Callable[[Any], str]] = {-1: str, ord("s"): str, ord("r"): repr, ord("a"): ascii}
_DESCRIPTIONS: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehension",
    ast.SetComp: "comprehension",
    ast.DictComp: "comprehension",
    ast.GeneratorExp: "generator expression",
    ast.Subscript: "subscript",
    ast.Compare: "comparison",
    ast.BoolOp: "boolean operator",
    ast.IfExp: "conditional expression",
    ast.NamedExpr: "assignment expression",
    ast.Starred: "unpacking",
}

# Registry names (without a scope prefix such as `mmdet.`) of the mmcv 1.x logger hooks that talk to W&B.
WANDB_HOOK_TYPES = frozenset({"MMDetWandbHook", "MMSegWandbHook", "WandbLoggerHook"})


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
    """An expression whose value would need real execution (or too much memory) to know."""


@dataclass(frozen=True)
class _Skip:
    """A name Python would have bound, whose value we do not know, and why."""

    reason: str


def _snippet(node: ast.AST) -> str:
    """The start of the offending source, to make a skip reason actionable."""
    try:
        text = (ast.unparse(node).splitlines() or [""])[0]
    except RecursionError:
        return type(node).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _unsupported(node: ast.AST, why: str) -> _Unsupported:
    return _Unsupported(f"line {getattr(node, 'lineno', '?')}: `{_snippet(node)}` is not evaluated ({why})")


def _to_json(value: Any) -> Any:
    """The shape W&B stores: tuples, ranges and sets become lists (sets in a stable order)."""
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, set):
        try:
            ordered = sorted(value)
        except TypeError:
            ordered = sorted(value, key=repr)
        return [_to_json(v) for v in ordered]
    if isinstance(value, (list, tuple, range)):
        return [_to_json(v) for v in value]
    return value


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _touched_names(node: ast.AST) -> tuple[set[str], set[str | None]]:
    """Top-level names that unevaluated code may (re)bind, and names it may modify in place."""
    bound: set[str] = set()
    modified: set[str | None] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(n.name)
            continue  # the body runs in its own scope
        if isinstance(n, ast.Lambda):
            continue
        if isinstance(n, ast.comprehension):
            stack.extend([n.iter, *n.ifs])  # its loop variable is local to the comprehension
            continue
        changes = isinstance(getattr(n, "ctx", None), (ast.Store, ast.Del))
        if isinstance(n, ast.Name) and changes:
            bound.add(n.id)
        elif isinstance(n, (ast.Attribute, ast.Subscript)) and changes:
            modified.add(_root_name(n))
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):  # e.g. model.update(...)
            modified.add(_root_name(n.func))
        stack.extend(ast.iter_child_nodes(n))
    modified.discard(None)
    return bound, modified


class _Module:
    """The top-level namespace being rebuilt, statement by statement, in file order."""

    def __init__(self) -> None:
        # Insertion order is the order Python's module dict would have; a skipped name keeps its slot.
        self.bindings: dict[str, Any] = {}
        self.imported: set[str] = set()
        # id -> (value, JSON cost, depth); the value is kept alive so that its id is never reused.
        self._sizes: dict[int, tuple[Any, int, int]] = {}

    # -- statements ---------------------------------------------------------------------------------
    def run(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            self.imported.update((a.asname or a.name).split(".")[0] for a in stmt.names if a.name != "*")
            return
        if isinstance(stmt, ast.Delete) and all(isinstance(t, ast.Name) for t in stmt.targets):
            for target in stmt.targets:
                self.bindings.pop(target.id, None)  # type: ignore[attr-defined]
            return
        assignment = self._assignment(stmt)
        if assignment is None:
            self._not_evaluated(stmt, stmt)
            return
        targets, value = assignment
        try:
            result = self.value_of(value)
            self._check_size(result, value)
        except _Unsupported as exc:
            self._fail(targets, str(exc))
            self._not_evaluated(value, stmt)  # a failed expression may still hide a walrus or model.update()
        except RecursionError:
            self._fail(targets, f"line {stmt.lineno}: expression is nested too deeply")
        else:
            for target in targets:
                self._bind(target, result)

    @staticmethod
    def _assignment(stmt: ast.stmt) -> tuple[list[ast.expr], ast.expr] | None:
        """Targets and value of `a = ...`, `a, b = ...`, `a: T = ...` or `a += ...`; None for anything else."""
        if isinstance(stmt, ast.Assign):
            simple = all(
                isinstance(t, ast.Name)
                or isinstance(t, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Name) for e in t.elts)
                for t in stmt.targets
            )
            return (stmt.targets, stmt.value) if simple else None
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            return [stmt.target], stmt.value
        if isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
            current = ast.Name(id=stmt.target.id, ctx=ast.Load())
            return [stmt.target], ast.copy_location(ast.BinOp(left=current, op=stmt.op, right=stmt.value), stmt)
        return None

    def _bind(self, target: ast.expr, value: Any) -> None:
        if isinstance(target, ast.Name):
            self.bindings[target.id] = value
            return
        names = [e.id for e in target.elts]  # type: ignore[attr-defined]
        if isinstance(value, (list, tuple, range)) and len(value) == len(names):
            for name, item in zip(names, value):
                self.bindings[name] = item
        else:
            self._fail([target], f"line {target.lineno}: cannot unpack `{_snippet(target)}` from this value")

    def _fail(self, targets: list[ast.expr], reason: str) -> None:
        for target in targets:
            for name in [target] if isinstance(target, ast.Name) else target.elts:  # type: ignore[attr-defined]
                self.bindings[name.id] = _Skip(reason)

    def _not_evaluated(self, node: ast.AST, stmt: ast.stmt) -> None:
        """Mark what code we do not run could have changed, so no stale value is reported."""
        bound, modified = _touched_names(node)
        for name in bound:
            self.bindings[name] = _Skip(f"line {stmt.lineno}: set by `{_snippet(stmt)}`, which is not evaluated")
        for name in modified & self.bindings.keys():
            if name not in bound:
                self.bindings[name] = _Skip(
                    f"line {stmt.lineno}: may be modified by `{_snippet(stmt)}`, which is not evaluated"
                )

    def _check_size(self, value: Any, node: ast.AST) -> None:
        """Reject values whose JSON form would be huge or absurdly deep, as shared references can make it."""
        cost, depth = self._measure(value)
        if depth > _MAX_DEPTH:
            raise _Unsupported(f"line {node.lineno}: value is nested more than {_MAX_DEPTH} levels deep")
        if cost > _MAX_COST:
            raise _Unsupported(f"line {node.lineno}: value is too large")

    def _measure(self, value: Any) -> tuple[int, int]:
        """JSON cost (items + characters) and depth, memoised so that each reference costs O(1)."""
        if isinstance(value, (str, range)):
            return 1 + len(value), 0
        if not isinstance(value, (dict, list, tuple, set)):
            return 1, 0
        if id(value) in self._sizes:
            return self._sizes[id(value)][1:]
        cost, depth = 1, 0
        for child in (*value.keys(), *value.values()) if isinstance(value, dict) else value:
            child_cost, child_depth = self._measure(child)
            cost, depth = cost + child_cost, max(depth, child_depth)
            if cost > _MAX_COST or depth > _MAX_DEPTH:
                break  # already too big; the exact figure does not matter
        self._sizes[id(value)] = (value, cost, depth + 1)
        return cost, depth + 1

    # -- expressions --------------------------------------------------------------------------------
    def value_of(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            if node.value is None or isinstance(node.value, (str, int, float)):
                return node.value
            raise _unsupported(node, f"{type(node.value).__name__} constant")
        if isinstance(node, ast.Name):
            return self._lookup(node)
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = [self.value_of(e) for e in node.elts]
            if isinstance(node, ast.Set):
                try:
                    return set(items)
                except TypeError:
                    raise _unsupported(node, "unhashable set element") from None
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Dict):
            return self._dict_display(node)
        if isinstance(node, ast.UnaryOp):
            operand = self.value_of(node.operand)
            if isinstance(node.op, (ast.USub, ast.UAdd)) and isinstance(operand, (int, float)):
                return -operand if isinstance(node.op, ast.USub) else +operand
            raise _unsupported(node, "unary operator")
        if isinstance(node, ast.BinOp):
            return self._binop(node)
        if isinstance(node, ast.JoinedStr):
            return "".join(self._fstring_part(part) for part in node.values)
        if isinstance(node, ast.Call):
            return self._call(node)
        raise _unsupported(node, _DESCRIPTIONS.get(type(node), type(node).__name__))

    def _lookup(self, node: ast.Name) -> Any:
        if node.id not in self.bindings:
            origin = "comes from an import" if node.id in self.imported else "is not defined earlier in this file"
            raise _Unsupported(f"line {node.lineno}: name `{node.id}` {origin}")
        value = self.bindings[node.id]
        if isinstance(value, _Skip):
            raise _Unsupported(f"line {node.lineno}: uses `{node.id}`, which was skipped")
        return value

    def _dict_display(self, node: ast.Dict) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        for key, value in zip(node.keys, node.values):
            if key is None:  # {**other}
                other = self.value_of(value)
                if not isinstance(other, Mapping):
                    raise _unsupported(value, "`**` of a non-dict")
                result.update(other)
                continue
            key_value, item = self.value_of(key), self.value_of(value)
            try:
                result[key_value] = item
            except TypeError:
                raise _unsupported(key, "unhashable dict key") from None
        return result

    def _binop(self, node: ast.BinOp) -> Any:
        left, right = self.value_of(node.left), self.value_of(node.right)
        operation = _ARITHMETIC.get(type(node.op))
        if operation and isinstance(left, (int, float)) and isinstance(right, (int, float)):
            if isinstance(left, int) and isinstance(right, int):
                grows = (
                    isinstance(node.op, ast.Pow) and right > 0 and right * abs(left).bit_length() > _MAX_INT_BITS
                    or isinstance(node.op, ast.Mult) and left.bit_length() + right.bit_length() > _MAX_INT_BITS
                )
                if grows:
                    raise _unsupported(node, "integer too large")
            try:
                result = operation(left, right)
            except ArithmeticError as exc:
                raise _unsupported(node, f"arithmetic ({type(exc).__name__})") from None
            if not isinstance(result, (int, float)):  # e.g. (-8) ** (1/3) is complex
                raise _unsupported(node, f"{type(result).__name__} result")
            return result
        if isinstance(node.op, ast.Add) and type(left) is type(right) and isinstance(left, (str, list, tuple)):
            if len(left) + len(right) > _MAX_COST:
                raise _unsupported(node, "result too large")
            return left + right
        raise _unsupported(node, "operator not supported for these operand types")

    def _fstring_part(self, part: ast.expr) -> str:
        if isinstance(part, ast.Constant):
            return str(part.value)
        if isinstance(part, ast.FormattedValue) and part.format_spec is None:
            value = self.value_of(part.value)
            self._check_size(value, part)
            return _CONVERSIONS[part.conversion](value)
        raise _unsupported(part, "f-string format spec")

    def _call(self, node: ast.Call) -> Any:
        """Only the side-effect-free builtins that dumps use: dict(...), float('inf'), range(n)."""
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in ("dict", "float", "range") or name in self.bindings or name in self.imported:
            raise _unsupported(node, "call")
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise _unsupported(node, "call with `*` arguments")
        args = [self.value_of(a) for a in node.args]
        if name == "dict":
            return self._dict_call(node, args)
        if node.keywords:
            raise _unsupported(node, "call with keywords")
        try:
            if name == "float" and len(args) == 1 and isinstance(args[0], (str, int, float)):
                return float(args[0])
            if name == "range" and all(isinstance(a, int) for a in args):
                result = range(*args)
                if len(result) > _MAX_COST:
                    raise _unsupported(node, "range too long")
                return result
        except (TypeError, ValueError) as exc:
            raise _unsupported(node, f"call ({exc})") from None
        raise _unsupported(node, "unsupported arguments")

    def _dict_call(self, node: ast.Call, args: list[Any]) -> dict[Any, Any]:
        if len(args) > 1 or args and not isinstance(args[0], Mapping):
            raise _unsupported(node, "dict() with a positional argument that is not a dict")
        result: dict[Any, Any] = dict(args[0]) if args else {}
        seen: set[str] = set()
        for keyword in node.keywords:
            value = self.value_of(keyword.value)
            if keyword.arg is not None:
                items: Mapping[Any, Any] = {keyword.arg: value}
            elif isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
                items = value
            else:
                raise _unsupported(keyword.value, "`**` of a non-dict or of non-string keys")
            if seen & items.keys():
                raise _unsupported(node, "repeated keyword")  # a TypeError in Python
            seen.update(items.keys())
            result.update(items)
        return result


def evaluate_config(source: str, filename: str = "<config>") -> ConfigDump:
    """Evaluate a config's top-level variables from its syntax tree alone; never exec/eval/import.

    Names starting with `_` (e.g. `_base_`) are usable by later lines but not reported.
    Raises ConfigParseError (with filename and line) when the source is not valid Python.
    """
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        raise ConfigParseError(filename, exc.lineno, exc.msg) from exc
    except (ValueError, RecursionError) as exc:  # a NUL byte; nesting too deep for Python's own compiler
        raise ConfigParseError(filename, None, str(exc)) from exc
    module = _Module()
    for stmt in tree.body:
        module.run(stmt)
    public = {k: v for k, v in module.bindings.items() if not k.startswith("_")}
    return ConfigDump(
        values={k: _to_json(v) for k, v in public.items() if not isinstance(v, _Skip)},
        skipped={k: v.reason for k, v in public.items() if isinstance(v, _Skip)},
    )


# -- extractors over the evaluated values -------------------------------------------------------------
def _get(cfg: Any, *path: str) -> Any:
    """Follow dict keys; None where a level is missing or is not a dict."""
    for key in path:
        if not isinstance(cfg, Mapping):
            return None
        cfg = cfg.get(key)
    return cfg


def _type_name(entry: Any) -> str:
    """A registry type without its scope prefix (`mmdet.MMDetWandbHook` -> `MMDetWandbHook`)."""
    kind = _get(entry, "type")
    return kind.rsplit(".", 1)[-1] if isinstance(kind, str) else ""


def _entries(value: Any) -> list[Any]:
    """Hook/backend lists, tolerating a single dict where a list is expected."""
    if isinstance(value, Mapping):
        return [value]
    return list(value) if isinstance(value, (list, tuple)) else []


def _loop_by_epoch(entry: Any) -> bool | None:
    """Epoch- or iteration-based from a runner (mmcv) or train loop (mmengine) entry."""
    if not isinstance(entry, Mapping):
        return None
    name = _type_name(entry)
    if "EpochBased" in name:
        return True
    if "IterBased" in name:
        return False
    if "max_epochs" in entry or "max_iters" in entry:  # custom runner/loop types
        return "max_epochs" in entry
    by_epoch = entry.get("by_epoch")  # mmengine builds a loop from by_epoch when no type is given
    return by_epoch if isinstance(by_epoch, bool) else None


def runner_by_epoch(cfg: Mapping[str, Any]) -> bool | None:
    """Whether training counts epochs; it decides how log lines map to W&B steps."""
    for entry in (cfg.get("runner"), cfg.get("train_cfg")):
        by_epoch = _loop_by_epoch(entry)
        if by_epoch is not None:
            return by_epoch
    return True if is_number(cfg.get("total_epochs")) else None  # mmdet 2.x before `runner` existed


def _optimizer(cfg: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """`optim_wrapper.optimizer` (mmengine) or `optimizer` (mmcv)."""
    optimizer = _get(cfg, "optim_wrapper", "optimizer")
    if not isinstance(optimizer, Mapping):
        optimizer = cfg.get("optimizer")
    return optimizer if isinstance(optimizer, Mapping) else None


def optimizer_momentum(cfg: Mapping[str, Any]) -> float | None:
    """The `momentum` (or first of `betas`) the config sets; None where it leaves it to torch."""
    optimizer = _optimizer(cfg)
    if optimizer is None:
        return None
    momentum = optimizer.get("momentum")
    if is_number(momentum):
        return float(momentum)
    betas = optimizer.get("betas")
    if isinstance(betas, (list, tuple)) and betas and is_number(betas[0]):
        return float(betas[0])
    return None


def wandb_hook_options(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The W&B hook entry (mmcv) or WandbVisBackend entry (mmengine), `type` included, as its options.

    For a `log_config.hooks` entry without `interval`, the interval is `log_config.interval`, because
    mmcv's `register_logger_hooks` passes it as the default.
    """
    log_config = cfg.get("log_config")
    for entry in _entries(_get(log_config, "hooks")):
        if isinstance(entry, Mapping) and _type_name(entry) in WANDB_HOOK_TYPES:
            options = dict(copy.deepcopy(entry))
            default_interval = _get(log_config, "interval")
            if "interval" not in options and default_interval is not None:
                options["interval"] = default_interval
            return options
    for entry in _entries(_get(cfg, "visualizer", "vis_backends")):
        if isinstance(entry, Mapping) and _type_name(entry) == "WandbVisBackend":
            return dict(copy.deepcopy(entry))
    return None


def checkpoint_interval(cfg: Mapping[str, Any]) -> int | None:
    """CheckpointHook interval: which checkpoints exist and when the hook uploaded them."""
    interval = as_int(_get(cfg, "checkpoint_config", "interval"))
    return interval if interval is not None else as_int(_get(cfg, "default_hooks", "checkpoint", "interval"))


def evaluation_interval(cfg: Mapping[str, Any]) -> int | None:
    """Validation interval: when val rows and prediction tables are expected."""
    interval = as_int(_get(cfg, "evaluation", "interval"))
    return interval if interval is not None else as_int(_get(cfg, "train_cfg", "val_interval"))


def log_interval(cfg: Mapping[str, Any]) -> int | None:
    """Logger interval: how many iterations one train row stands for."""
    interval = as_int(_get(cfg, "log_config", "interval"))
    return interval if interval is not None else as_int(_get(cfg, "default_hooks", "logger", "interval"))


# -- the run's config ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    """A run's evaluated config and the settings the sidecar needs to replay MMDetWandbHook."""

    name: str  # the file name the config is uploaded as
    text: str
    values: dict[str, Any]
    by_epoch: bool | None
    momentum: float | None  # what the hook logged with every row (no log file carries it)
    log_interval: int | None
    eval_interval: int | None  # validation every N epochs (or iterations); None: no validation configured
    hook_options: dict[str, Any]


def load_text(text: str, name: str) -> RunConfig | None:
    """The config in `text`; None when it is not valid Python."""
    try:
        values = evaluate_config(text, name).values
    except ConfigParseError:
        return None
    return RunConfig(
        name=name, text=text, values=values, by_epoch=runner_by_epoch(values),
        momentum=_momentum(values), log_interval=log_interval(values),
        eval_interval=_eval_interval(values), hook_options=wandb_hook_options(values) or {},
    )


def _eval_interval(values: dict[str, Any]) -> int | None:
    """mmdet 2.x validates every epoch when `evaluation` gives no interval; mmengine when a val loop exists."""
    interval = evaluation_interval(values)
    if interval is not None:
        return interval
    return 1 if isinstance(values.get("evaluation"), dict) or isinstance(values.get("val_cfg"), dict) else None


def _momentum(values: dict[str, Any]) -> float | None:
    """The config's momentum, else torch's default for the optimizer type."""
    found = optimizer_momentum(values)
    if found is not None:
        return found
    kind = _get(_optimizer(values), "type")
    return TORCH_DEFAULT_MOMENTUM.get(kind) if isinstance(kind, str) else None


def load_file(path: Path) -> RunConfig | None:
    try:
        text = read_head(path, MAX_CONFIG_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return None
    return load_text(text, path.name)


def for_log(found: FoundLog) -> RunConfig | None:
    """mmdet 2.x: `work_dir/<exp_name>` or the header's config; mmengine: `vis_data/config.py`."""
    if found.format is LogFormat.MMENGINE_SCALARS and found.config is not None:
        return load_file(found.config)
    if found.format is not LogFormat.MMDET2_LOGJSON:
        return None
    header = _first_line(found.path)
    exp_name = header.get("exp_name")
    if isinstance(exp_name, str) and exp_name and "/" not in exp_name:
        config = load_file(found.work_dir / exp_name)
        if config is not None:
            return config
    text = header.get("config")
    if isinstance(text, str):
        return load_text(text, exp_name if isinstance(exp_name, str) and exp_name else "config.py")
    return None


def _first_line(path: Path) -> dict[str, Any]:
    try:
        line = read_head(path, MAX_CONFIG_BYTES).split(b"\n", 1)[0]
        header = json.loads(line)
    except (OSError, ValueError):
        return {}
    return header if isinstance(header, dict) else {}
