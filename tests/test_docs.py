"""The docs site builds with `mkdocs build --strict` (no broken link, every page in the nav), and its configuration
reference, generated from the CLI at build time, names every option of every command and every environment
variable the product's code reads."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs/hooks/config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Sections(HTMLParser):
    """The text of a page, and the text under each <h3> (one per command)."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.sections: dict[str, list[str]] = {}
        self._heading: list[str] | None = None
        self._current: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "h3":
            self._heading = []
        elif tag == "h2":
            self._current = None

    def handle_endtag(self, tag):
        if tag == "h3" and self._heading is not None:
            self._current = self.sections.setdefault("".join(self._heading).strip().rstrip("¶").strip(), [])
            self._heading = None

    def handle_data(self, data):
        self.text.append(data)
        if self._heading is not None:
            self._heading.append(data)
        elif self._current is not None:
            self._current.append(data)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> _Sections:
    site = tmp_path_factory.mktemp("site")
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    page = _Sections()
    page.feed((site / "configuration/index.html").read_text(encoding="utf-8"))
    return page


def test_every_variable_the_code_reads_is_in_the_reference(reference):
    variables = _generator().source_variables()
    assert {"MMDET_WANDB_HOME", "MMDET_WANDB_DB_URL", "WANDB_API_KEY", "MMDET_WANDB_BBOX_SCORE_THR"} <= variables
    text = " ".join(reference.text)
    assert sorted(v for v in variables if v not in text) == []


def test_every_option_of_every_command_is_in_its_section(reference):
    generator = _generator()
    commands = list(generator.commands())
    assert len(commands) >= 10
    missing = []
    for path, command in commands:
        section = " ".join(reference.sections.get(path, []))
        assert section, f"no section for {path}"
        for param in command.params:
            names = [*param.opts, *param.secondary_opts] if param.param_type_name == "option" else [param.name.upper()]
            missing += [f"{path} {name}" for name in names if name not in section]
    assert missing == []
