"""packaging/: the systemd units and the logrotate file are valid and name the real programs (issue 19)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "packaging" / "systemd").glob("*.service"))


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing (CI=true: a missing tool fails the run)")
        pytest.skip(f"{name} is not installed")
    return found


def test_units_start_the_installed_programs_with_readiness() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {unit.name for unit in UNITS} == {"replicatord@.service", "replicator-witness.service"}
    for unit in UNITS:
        text = unit.read_text()
        assert "Type=notify" in text and "NotifyAccess=main" in text
        programs = re.findall(r"^Exec\w+=-?/usr/bin/([\w-]+)", text, re.MULTILINE)
        assert programs and all(program in scripts for program in programs), programs
    site = (ROOT / "packaging" / "systemd" / "replicatord@.service").read_text()
    assert "ExecStop=-/usr/bin/replicatorctl drain" in site  # a planned stop drains first


def test_units_pass_systemd_analyze(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    for unit in UNITS:
        shutil.copy(unit, tmp_path / unit.name)
    instance = tmp_path / "replicatord@a.service"
    shutil.copy(tmp_path / "replicatord@.service", instance)
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(instance), str(tmp_path / "replicator-witness.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # The programs are not installed on a test machine; anything else is a mistake in the files.
    problems = [line for line in done.stderr.splitlines() if line.strip() and "is not executable" not in line]
    assert not problems, done.stderr


def test_logrotate_file_parses(tmp_path: Path) -> None:
    logrotate = tool("logrotate")
    # The `replicator` user exists on a real host only: the same file with root's, for this machine.
    text = (ROOT / "packaging" / "logrotate" / "replicator").read_text()
    assert "create 0640 replicator replicator" in text
    copy = tmp_path / "replicator"
    copy.write_text(text.replace("create 0640 replicator replicator", "create 0640 root root"))
    done = subprocess.run(
        [logrotate, "--debug", "--state", str(tmp_path / "state"), str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "error" not in done.stderr.lower(), done.stderr
