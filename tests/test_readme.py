"""The README's shell blocks marked runnable (a fence opened with ```bash runnable) run as
written, from a scratch folder, and print what the README shows: the output block that follows
one, if any, has each of its lines in the real output with the numbers left open (the format
and the words are checked, not figures that move with the planner's data). Blocks that need a
server, a download or minutes (install, the full tests, serve, bench) are not marked."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def runnable_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(script, the lines of the output block right after it, or []) per runnable block."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash runnable":
            end = lines.index("```", i + 1)
            shown = []
            if end + 1 < len(lines) and lines[end + 1] == "```":
                shown = lines[end + 2:lines.index("```", end + 2)]
            blocks.append(("\n".join(lines[i + 1:end]), shown))
            i = end
        i += 1
    return blocks


def shape(line: str) -> str:
    return " ".join(_NUMBER.sub("N", line).split())


BLOCKS = runnable_blocks(README.read_text())


def test_the_readme_marks_its_quick_commands_runnable():
    assert [script.split()[1] for script, _ in BLOCKS] == ["plan", "simulate"]


@pytest.mark.parametrize("script,shown", BLOCKS, ids=[s.split()[1] for s, _ in BLOCKS])
def test_a_runnable_readme_block_runs_as_written(script, shown, tmp_path):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = {shape(line) for line in (done.stdout + done.stderr).splitlines()}
    missing = [line for line in shown if shape(line) not in printed]
    assert not missing, f"the README shows lines this run did not print: {missing}"
