"""tools/gpu/*.sh, the prepared GPU session scripts: what can fail before the GPU is reached.

A session has 15 minutes of device time; a script that stops on a syntax error or passes a tool
a flag it does not take loses them. Each script parses, and every flag it hands one of our tools
is one that tool's command line takes.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "tools" / "gpu").glob("*.sh"))
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _logical_lines(text: str) -> list[str]:
    """The script's lines with backslash continuations joined and comments dropped."""
    lines = text.replace("\\\n", " ").splitlines()
    return [line for line in lines if not line.lstrip().startswith("#")]


def _variable_flags(name: str, lines: list[str]) -> set[str]:
    """The flags a script variable holds: from its assignments, or an array's definition."""
    flags = set()
    for line in lines:
        for match in re.finditer(rf"\b{name}=(\$\(.*?\)|\(.*?\)|\S+)", line):
            flags |= set(FLAG.findall(match.group(1)))
    return flags


def tool_invocations(script: Path) -> list[tuple[str, set[str]]]:
    """(tool, the flags the script passes it) for each `python3 tools/<tool>.py` call."""
    lines = _logical_lines(script.read_text())
    lines += _logical_lines((REPO / "tools" / "gpu" / "setup.sh").read_text())  # sourced
    calls = []
    function = None  # the shell function being defined, if any
    for line in lines:
        if head := re.match(r"(\w+)\(\) *\{", line):
            function = head.group(1)
        match = re.search(r"python3 tools/(\w+)\.py(.*)", line)
        if not match:
            continue
        tool, args = match.groups()
        args = re.split(r"\s(?:\d?>|\|)", args)[0]  # up to the first redirection or pipe
        flags = set(FLAG.findall(args))
        for variable in re.findall(r"\$\{?(\w+)", args):
            flags |= _variable_flags(variable, lines)
        if '"$@"' in args:  # the function's arguments: the flags of the lines calling it
            for caller in lines:
                # environment assignments before the call (ROW_XLA_FLAGS=...) are not its flags
                call = re.sub(r"^(\w+=\S+ )*", "", caller.strip())
                if call.startswith(f"{function} "):
                    flags |= set(FLAG.findall(call))
        calls.append((tool, flags))
    return calls


def _accepted_flags(tool: str) -> set[str]:
    help_text = subprocess.run(
        [sys.executable, str(REPO / "tools" / f"{tool}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return set(FLAG.findall(help_text))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_flag_a_script_passes_our_tools_is_one_they_take():
    passed: dict[str, set[str]] = {}
    for script in SCRIPTS:
        for tool, flags in tool_invocations(script):
            passed.setdefault(tool, set()).update(flags)
    # the scripts call these four, with these flags among others
    assert set(passed) == {"bench_attention", "bench_train", "sweep", "profile_summary"}
    assert {"--tune-hopper", "--no-hopper", "--once"} <= passed["bench_attention"]
    assert {"--model-override", "--profile", "--loss-chunk"} <= passed["bench_train"]
    for tool, flags in passed.items():
        unknown = flags - _accepted_flags(tool)
        assert not unknown, f"tools/{tool}.py does not take {sorted(unknown)}"


def test_cap_keeps_every_step_inside_the_budget():
    """`cap N` (setup.sh): N, or what is left of BUDGET_S less 20 s for the tables, at least 1."""
    text = (REPO / "tools" / "gpu" / "setup.sh").read_text()
    block = re.search(r"^BUDGET_S=.*?^}\n", text, re.MULTILINE | re.DOTALL).group(0)
    script = block + "echo $(cap 90); BUDGET_S=100; echo $(cap 90); SECONDS=95; echo $(cap 90)"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["90", "80", "1"]


def test_every_timeout_in_the_scripts_is_capped():
    for script in SCRIPTS:
        for line in _logical_lines(script.read_text()):
            if re.search(r"\btimeout\s", line):
                capped = ('timeout "$(cap ', 'timeout "$limit"', 'timeout -k 30 "$(cap ')
                assert any(c in line for c in capped), (script, line)
