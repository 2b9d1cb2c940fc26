"""tools/: every Python tool runs as ``python -m tools.NAME`` from the repository root, names its
output file ``--output``, and none of them edits ``sys.path``."""
import functools
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = sorted(path.stem for path in (REPO / "tools").glob("*.py") if path.stem != "__init__")


@functools.cache
def help_text(tool: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"tools.{tool}", "--help"], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_runs_as_a_module_from_the_repository_root(tool):
    done = help_text(tool)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_names_its_output_file_output(tool):
    assert "--output" in help_text(tool).stdout


def test_no_tool_edits_sys_path():
    editing = [path.name for path in (REPO / "tools").iterdir() if path.is_file() and "sys.path" in path.read_text()]
    assert editing == []
