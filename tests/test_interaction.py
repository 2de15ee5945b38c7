"""Interaction scripts (tests/interaction/*.txt, docs/interaction.md): each runs against the real
cores and must produce exactly the trace written in it; each plant a script names in its
`# catches:` line must change that trace.

Rewrite the expected traces after a deliberate change (commit the diff only if you understand it):

    REPLICATOR_REWRITE=1 .venv/bin/python -m pytest tests/test_interaction.py
    .venv/bin/python -m chaos.interaction --rewrite tests/interaction/*.txt
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

from chaos.interaction import ScriptError, check_file, parse_script, plants_caught
from replicator.core.config import PLANTS, SIMULATOR_PLANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "tests", "interaction", "*.txt")))
REWRITE = os.environ.get("REPLICATOR_REWRITE") == "1"


def name(path: str) -> str:
    return os.path.basename(path)


def caught_pairs() -> list[tuple[str, str]]:
    pairs = []
    for path in SCRIPTS:
        with open(path, encoding="utf-8") as stream:
            script = parse_script(path, stream.read())
        pairs.extend((path, plant) for plant in plants_caught(script))
    return pairs


def test_there_are_scripts() -> None:
    assert len(SCRIPTS) >= 8, SCRIPTS


@pytest.mark.parametrize("path", SCRIPTS, ids=name)
def test_script_trace_is_as_written(path: str) -> None:
    diff = check_file(path, rewrite=REWRITE)
    if REWRITE:
        return
    assert not diff, (
        f"{name(path)}: the trace differs (lines marked + are what the cores did now):\n{diff}\n"
        "If the change is deliberate, rewrite: REPLICATOR_REWRITE=1 .venv/bin/python -m pytest "
        "tests/test_interaction.py (commit the diff only if you understand it)"
    )


@pytest.mark.parametrize("path,plant", caught_pairs(), ids=lambda x: name(x) if x.endswith(".txt") else x)
def test_each_plant_a_script_names_changes_its_trace(path: str, plant: str) -> None:
    assert plant in PLANTS or plant in SIMULATOR_PLANTS, f"{name(path)} names an unknown plant {plant!r}"
    diff = check_file(path, extra_plants=frozenset({plant}))
    assert diff, f"{name(path)} does not notice plant {plant}: the check it relies on could go unseen"


def test_the_gap_check_of_seed_61196_is_pinned() -> None:
    """Issue 12: the seed-61196 script fails if the core's sequence check is removed."""
    pairs = caught_pairs()
    assert any(name(path) == "seed-61196-stale-read.txt" and plant == "accept_gaps" for path, plant in pairs)


def test_rewrite_restores_a_script_and_a_mismatch_is_reported(tmp_path: os.PathLike[str]) -> None:
    original = os.path.join(ROOT, "tests", "interaction", "replicated-write.txt")
    copy = os.path.join(tmp_path, "replicated-write.txt")
    shutil.copy(original, copy)
    with open(copy, encoding="utf-8") as stream:
        text = stream.read()
    assert "  a answers #1 ok\n" in text
    with open(copy, "w", encoding="utf-8") as stream:
        stream.write(text.replace("  a answers #1 ok\n", "  a answers #1 unavailable\n"))
    diff = check_file(copy)
    assert "-  a answers #1 unavailable" in diff and "+  a answers #1 ok" in diff
    cli = subprocess.run([sys.executable, "-m", "chaos.interaction", copy], cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 1 and "differs" in cli.stderr
    rewritten = subprocess.run([sys.executable, "-m", "chaos.interaction", "--rewrite", copy], cwd=ROOT, capture_output=True, text=True)
    assert rewritten.returncode == 0, rewritten.stderr
    with open(copy, encoding="utf-8") as stream:
        assert stream.read() == text
    assert check_file(copy) == ""


def test_malformed_scripts_are_refused_with_their_line(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "bad.txt")
    with open(path, "w", encoding="utf-8") as stream:
        stream.write("# goal\n\nstart\nconnect\n----\n")
    with pytest.raises(ScriptError, match=r"bad.txt:3: a command must be followed by a line '----'"):
        check_file(path)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write("start\n----\n")
    with pytest.raises(ScriptError, match="opens with '#' lines"):
        check_file(path)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write("# goal\n\nstart\n----\n\nfly a\n----\n\nstate\n----\n")
    check_file(path, rewrite=True)
    with open(path, encoding="utf-8") as stream:
        text = stream.read()
    assert "fly a\n----\nerror: unknown command 'fly'\n" in text and "state\n----\n(not run)\n" in text
