"""mkdocs hook: the configuration reference, built at build time from the CLI's click command tree and the hook's
option table, so that it cannot drift from the code. `docs/configuration.md` holds the marker it replaces."""
from __future__ import annotations

import enum
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- config-reference -->"
PACKAGES = ("common", "db", "uploader", "evaluator", "mmdet_wandb")
VARIABLE = re.compile(r"\b(?:MMDET_WANDB_[A-Z0-9_]+|WANDB_[A-Z_]+)\b")
#: Variables the code reads that no CLI option names in its help: what each one does.
OTHER_VARIABLES = {
    "MMDET_WANDB_DB_URL": "The state DB as an SQLAlchemy URL (e.g. `postgresql+psycopg://...`; install the `postgres` extra); default `<data dir>/state.db` (SQLite). A password in it is a secret: scrubbed from logs",
    "MMDET_WANDB_HEARTBEAT_DIR": "Where a service touches its heartbeat file, which `health` reads (compose: `/tmp` for the evaluator); default the data dir",
    "MMDET_WANDB_MMDET2_PYTHON": "The python of the mmdet 2.x environment, for `backfill --evaluate` jobs of that stack run from the other environment",
    "MMDET_WANDB_MMDET3_PYTHON": "The python of the mmdet 3.x environment (`.venv-mmdet3`; `./dev.sh` sets it), for `backfill --evaluate` jobs of that stack",
    "MMDET_WANDB_WANDB_PUBLIC_ONLY": "`1`: use only wandb's public API, as on a wandb release the private paths were not verified on (uploader/wandb/private_api.py); slower artifact and history writes",
    "MMDET_WANDB_CRASH_AT": "Tests and `benchmarks/faults.py` only: `<point>` or `<point>:<n>` makes the process SIGKILL itself at that crash point",
    "WANDB_API_KEY": "W&B credentials: online uploads. A secret: never written to the DB, run files or logs; `evaluate` refuses to start with it unless `--allow-secrets`",
    "WANDB_MODE": "`online`, `offline` or `disabled`; unset: online with an API key, else offline (the embedded default)",
    "WANDB_BASE_URL": "The W&B server (default `https://api.wandb.ai`); the circuit's probe queries it",
    "WANDB_DIR": "Offline runs go under `$WANDB_DIR/mmdet-wandb/` instead of `<data dir>/wandb/`",
    "WANDB_DATA_DIR": "wandb's own data dir (default: in the data directory)",
    "WANDB_CACHE_DIR": "wandb's cache dir (default: in the data directory)",
    "WANDB_CONFIG_DIR": "wandb's config dir (default: in the data directory)",
}


def source_variables() -> set[str]:
    """Every `MMDET_WANDB_*` / `WANDB_*` name in the product's Python sources, less the Python constants named so
    (`WANDB_HOOK_TYPES = ...` is a name, not a variable)."""
    found, constants = set(), set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            found |= set(VARIABLE.findall(text))
            constants |= set(re.findall(r"^\s*((?:MMDET_)?WANDB_[A-Z0-9_]+)\s*[:=]", text, flags=re.M))
    return found - constants


def _app():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import typer

    from mmdet_wandb import cli

    return typer.main.get_command(cli.app)


def commands(group=None, path: tuple[str, ...] = ("mmdet-wandb",)):
    """(command path, click command) for every leaf command, in the CLI's order."""
    group = group if group is not None else _app()
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def flags(param) -> list[str]:
    return [*param.opts, *param.secondary_opts]


def variables_of(param) -> list[str]:
    named = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
    return list(dict.fromkeys([*named, *VARIABLE.findall(getattr(param, "help", None) or "")]))


def _cell(text: str) -> str:
    """Markdown table cell: pipes escaped, angle brackets outside code spans escaped."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def _default(param) -> str:
    value = param.default
    if value is None or value == [] or value == ():
        return ""
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{value}`"


def _command_section(path: str, command) -> list[str]:
    lines = [f"### `{path}`", "", _cell((command.help or "").strip().split("\n\n")[0]), ""]
    lines += ["| option | default | environment | help |", "|---|---|---|---|"]
    for param in command.params:
        if getattr(param, "hidden", False):
            continue
        if param.param_type_name == "argument":
            name = f"`{param.name.upper()}{'...' if param.multiple or param.nargs == -1 else ''}` (argument)"
        else:
            name = " / ".join(f"`{flag}`" for flag in flags(param))
        env = ", ".join(f"`{v}`" for v in variables_of(param))
        lines.append(f"| {name} | {_default(param)} | {env} | {_cell(getattr(param, 'help', None) or '')} |")
    return lines + [""]


def allowed(option) -> str:
    """The option's range as its own check states it."""
    if option.low is not None and option.high is not None:
        return f"{option.low:g} to {option.high:g}"
    return f"{option.low:g} or more" if option.low is not None else "any"


def _hook_options_section(leaves) -> list[str]:
    from uploader import hook_options

    by_name = {}
    for _, command in leaves:
        for param in command.params:
            by_name.setdefault(param.name, param)
    lines = ["## The hook's options", "", "`uploader.hook_options.OPTIONS`: `MMDetWandbHook`'s names and defaults, and the config file's keys.", ""]
    lines += ["| option (config file key) | type | allowed | the hook's default | CLI | environment |", "|---|---|---|---|---|---|"]
    for name, option in hook_options.OPTIONS.items():
        param = by_name.get(name)
        cli_flags = " / ".join(f"`{f}`" for f in flags(param)) if param else ""
        env = ", ".join(f"`{v}`" for v in (variables_of(param) if param else [])) or f"`{hook_options.ENV_PREFIX}{name.upper()}`"
        lines.append(f"| `{name}` | `{option.kind.__name__}` | {allowed(option)} | `{option.default!r}` | {cli_flags} | {env} |")
    lines += ["", "Service options the config file may set too (the flag and its variable come first):", ""]
    lines += ["| config file key | CLI | environment |", "|---|---|---|"]
    for name in hook_options.SERVICE_OPTIONS:
        param = by_name.get(name)
        cli_flags = " / ".join(f"`{f}`" for f in flags(param)) if param else ""
        env = ", ".join(f"`{v}`" for v in (variables_of(param) if param else []))
        lines.append(f"| `{name}` | {cli_flags} | {env} |")
    return lines + [""]


def _variables_section(leaves) -> list[str]:
    named: dict[str, dict[str, list[str]]] = {}  # variable → flag → the commands that have it
    for path, command in leaves:
        for param in command.params:
            for variable in variables_of(param):
                flag = flags(param)[0] if flags(param) else param.name
                named.setdefault(variable, {}).setdefault(flag, []).append(f"`{path.removeprefix('mmdet-wandb ')}`")
    lines = ["## Environment variables", "", "Every variable the service reads.", ""]
    lines += ["| variable | what it sets |", "|---|---|"]
    for variable in sorted(set(named) | set(OTHER_VARIABLES)):
        text = OTHER_VARIABLES.get(variable) or "; ".join(f"`{flag}` of {', '.join(where)}" for flag, where in named[variable].items())
        lines.append(f"| `{variable}` | {_cell(text)} |")
    return lines + [""]


def reference_markdown() -> str:
    leaves = list(commands())
    lines = ["## Commands", "", "Every command and option, from the CLI itself (`mmdet-wandb COMMAND --help` prints the same).", ""]
    for path, command in leaves:
        lines += _command_section(path, command)
    lines += _hook_options_section(leaves) + _variables_section(leaves)
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    reference = reference_markdown()
    missing = sorted(v for v in source_variables() if f"`{v}`" not in reference)
    if missing:  # a warning: `mkdocs build --strict` fails on it
        import logging

        logging.getLogger("mkdocs.hooks.config_reference").warning("variables the code reads but the reference lacks: %s", ", ".join(missing))
    return markdown.replace(MARKER, reference)
