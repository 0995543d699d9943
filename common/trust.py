"""What the operator lets the worker run from the work_dirs. A checkpoint and a config's `custom_imports` are code
chosen by whoever wrote the work_dir, so by default the worker runs none of it: checkpoints go through the
weights-only unpickler (evaluator/checkpoint_globals.py), custom_imports only name modules listed here."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Trust:
    checkpoints: bool = False  # --trust-checkpoints: the full unpickler (weights_only=False)
    configs: bool = False  # --trust-configs: every config's custom_imports are imported
    imports: tuple[str, ...] = ()  # --allow-import: modules (and their submodules) custom_imports may name

    def refused(self, modules: Iterable[str]) -> list[str]:
        """The modules of a config's custom_imports that the worker may not import."""
        if self.configs:
            return []
        return [m for m in modules if not any(m == allowed or m.startswith(allowed + ".") for allowed in self.imports)]

    def warnings(self) -> list[str]:
        """One log line for each kind of code from the work_dirs that the worker will run."""
        lines = []
        if self.checkpoints:
            lines.append("--trust-checkpoints: checkpoints are loaded with the full unpickler (weights_only=False); "
                         "a checkpoint from a work_dir can run any code in this worker")
        if self.configs:
            lines.append("--trust-configs: every config's custom_imports are imported; a work_dir can run any module on this worker's path")
        return lines
