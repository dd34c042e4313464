"""The README's Quickstart and `.ci/run` hold the same two commands, so CI runs what a new user runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_quickstart_commands() -> list[str]:
    """The ```bash blocks of the README's `## Quickstart` section, one command each."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quickstart\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Quickstart' section"
    blocks = re.findall(r"```bash\n(.*?)```", section.group(1), re.S)
    return [block.strip() for block in blocks]


def ci_commands() -> dict[str, str]:
    text = (ROOT / ".ci" / "run").read_text()
    return dict(re.findall(r"^(MAIN_COMMAND|TEST_COMMAND)='(.*)'$", text, re.M))


def test_readme_quickstart_has_exactly_the_main_and_test_commands_of_ci():
    ci = ci_commands()
    assert set(ci) == {"MAIN_COMMAND", "TEST_COMMAND"}
    assert readme_quickstart_commands() == [ci["MAIN_COMMAND"], ci["TEST_COMMAND"]]


def test_ci_runs_the_main_command_in_a_fresh_venv_and_fails_on_error():
    text = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in text
    assert re.search(r"python3 -m venv", text)
    assert '$MAIN_COMMAND' in text and '$TEST_COMMAND' in text
