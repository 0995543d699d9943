"""`mmdet-wandb status` as a table: one row per W&B run, and one per open problem of no known work_dir."""
from __future__ import annotations

import os
import time
from typing import IO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.display_names import escape_controls
from db.session import Database
from mmdet_wandb import status

PIPE_WIDTH = 100_000  # a pipe or a file gets whole lines: grep and less see one row per line


def console(stream: IO[str]) -> Console:
    """A terminal is used at its width (COLUMNS wins, as everywhere); a pipe gets lines that are never wrapped."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() or stream.isatty():
        return Console(file=stream, width=int(columns) if columns.isdigit() else None)
    return Console(file=stream, width=PIPE_WIDTH)


def print_status(db: Database, *, as_json: bool, out: Console, node: str | None = None) -> None:
    statuses = status.collect(db, node)
    unreachable = status.unreachable(db, node)
    if as_json:
        print(status.as_json(statuses, status.problems(db, node), unreachable))
        return
    for down in unreachable:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(down["since"])) if down["since"] else "?"
        wait = max(0.0, (down["retry_at"] or time.time()) - time.time())
        out.print(f"[red]W&B unreachable[/red] from node {escape(down['node'])} since {since} "
                  f"({escape(down['base_url'])}: {_text(down['error'])}): uploads wait, logs are still read; next try in {wait:.0f} s")
    out.print(_table(statuses, status.loose_problems(db, statuses, node)))


def _table(statuses: list[status.WorkDirStatus], loose: list[status.LooseProblem]) -> Table:
    table = Table(title="mmdet-wandb status")
    several_nodes = len({s.node for s in statuses} | {p.node for p in loose}) > 1
    for column in ("node",) * several_nodes + ("work_dir", "logs", "W&B run", "uploaded", "pending", "synced / to sync", "checkpoints", "eval jobs", "problems / last error"):
        table.add_column(column, overflow="fold")
    for s in statuses:
        dead_job = next((j for j in reversed(s.eval_jobs) if j["state"] == "dead"), None)
        for index, run in enumerate(s.runs or [None]):
            error = (
                (run_error(run) if run and run.last_error else None)
                or (f"sync: {run.sync_error}" if run and run.sync_error else None)
                or (s.last_problem if index == 0 else None)
                or (dead_job_line(dead_job, s.eval_jobs) if index == 0 and dead_job else None)
            )
            table.add_row(
                *((_text(s.node) if index == 0 else "",) * several_nodes),
                _text(s.path) if index == 0 else "",
                str(s.logs) if index == 0 else "",
                f"{run.wandb_id} {_text(run.name)}" if run else "-",
                str(run.rows_uploaded) if run else "0",
                str(run.rows_pending) if run else "0",
                f"{run.segments_synced} / {run.segments_to_sync}" if run and (run.segments_synced or run.segments_to_sync) else "-",
                ", ".join(f"{n} {state}" for state, n in s.checkpoint_counts().items()) if index == 0 else "",
                ", ".join(f"{n} {state}" for state, n in s.eval_job_counts().items()) if index == 0 else "",
                (f"{s.problems} problem(s); " if index == 0 and s.problems else "") + _text(error or ""),
            )
    for problem in loose:
        seen = f" (seen {problem.count} times)" if problem.count > 1 else ""
        table.add_row(
            *((_text(problem.node),) * several_nodes), _text(problem.path), "-", "-", "-", "-", "-", "", "",
            f"[red]{problem.kind}[/red]: {_text(problem.message)}{seen}",
        )
    return table


def _text(value: str) -> str:
    """An outside string in a cell: no markup, no line of its own."""
    return escape(escape_controls(value))


def run_error(run: status.RunStatus) -> str:
    if run.retry_at is None:
        return run.last_error or ""
    wait = max(0.0, run.retry_at - time.time())
    return f"{run.last_error} (failure {run.failures} in a row; next try in {wait:.0f} s, or now with `mmdet-wandb retry`)"


def dead_job_line(job: dict[str, object], jobs: list[dict[str, object]]) -> str:
    pinned = sum(1 for j in jobs if j["pin"])
    held = f" ({pinned} dead job(s) hold their checkpoint pin: `requeue` retries them, `requeue --drop` releases them)" if pinned else ""
    return f"eval job {job['id']} ({job['checkpoint']}): {job['last_error']}{held}"
