"""CI does the README's set-up and runs the README's test command, not a set-up of its own."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bash_block(markdown: str, heading: str) -> list[str]:
    """The command lines of the first ```bash block under `heading` (comments and blanks dropped)."""
    section = markdown.split(f"\n{heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def ci_commands() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]


def test_ci_runs_the_readme_setup_in_order():
    readme = (ROOT / "README.md").read_text()
    setup = bash_block(readme, "## Set-up")
    assert any(c.startswith("pip install torch") and "whl/cpu" in c for c in setup), setup
    ci = ci_commands()
    positions = [ci.index(c) if c in ci else -1 for c in setup]
    assert -1 not in positions, f"README set-up commands missing from .ci/run: {setup} vs {ci}"
    assert positions == sorted(positions), "README set-up commands run in another order in .ci/run"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    tests = bash_block(readme, "## Tests")
    assert tests and all(c in ci_commands() for c in tests), (tests, ci_commands())
