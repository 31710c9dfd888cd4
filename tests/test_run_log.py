"""The run log: RUN_DIR/logs/process_<i>.log copies a training process's console output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from mpt_jax import run_log

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def _lines(path):
    """The log's lines with their time stamps checked and removed."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("===="):
            out.append(line)
            continue
        assert re.match(STAMP, line), line
        out.append(line[20:])
    return out


def test_output_before_and_after_attaching_reaches_console_and_log(tmp_path, capsys):
    console = sys.stdout, sys.stderr
    with run_log.captured_output():
        print("before the folder")
        print("an error line", file=sys.stderr)
        run_log.attach(tmp_path / "run", 3, argv=["mpt-jax", "train", "a b.yaml"])
        print("after", end="")
        print(" the folder")
        run_log.note("only in the log")
    assert (sys.stdout, sys.stderr) == console  # restored
    out, err = capsys.readouterr()
    assert out == "before the folder\nafter the folder\n"
    assert err == "an error line\n"
    lines = _lines(tmp_path / "run" / "logs" / "process_3.log")
    assert re.fullmatch(
        rf"==== {STAMP}start: pid \d+ on .+: mpt-jax train 'a b.yaml' ====", lines[0]
    )
    assert lines[1:3] == ["before the folder", "an error line"]
    assert lines[3] == "after the folder"
    assert lines[-1] == "only in the log"


def test_a_second_start_appends_and_a_progress_bar_leaves_its_last_frame(tmp_path, capsys):
    for attempt in range(2):
        with run_log.captured_output():
            run_log.attach(tmp_path, 0, argv=["attempt", str(attempt)])
            sys.stdout.write("\r 10%\r 50%\r100%\n")
            print("unfinished", end="")  # written when the capture ends
    lines = _lines(tmp_path / "logs" / "process_0.log")
    assert [x.rsplit(": ", 1)[-1] for x in lines if x.startswith("====")] == [
        "attempt 0 ====",
        "attempt 1 ====",
    ]
    assert [x for x in lines if not x.startswith("====")] == ["100%", "unfinished"] * 2
    assert (
        capsys.readouterr().out.count("\r 10%\r 50%\r100%\n") == 2
    )  # the console gets every frame


def test_an_exception_is_logged_before_it_propagates(tmp_path, capsys):
    with pytest.raises(ZeroDivisionError), run_log.captured_output():
        run_log.attach(tmp_path, 0)
        1 / 0  # noqa: B018
    text = (tmp_path / "logs" / "process_0.log").read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError" in text


def test_an_inner_capture_is_the_outer_one_and_nothing_is_kept_without_one(tmp_path, capsys):
    with run_log.captured_output() as outer:
        with run_log.captured_output() as inner:
            assert inner is outer
            run_log.attach(tmp_path, 0)
        print("after the inner one")  # still copied: the inner block restored nothing
    assert _lines(tmp_path / "logs" / "process_0.log")[-1] == "after the inner one"
    run_log.attach(tmp_path / "other", 0)  # no capture: nothing is made
    run_log.note("dropped")
    assert not (tmp_path / "other").exists()
    assert run_log.terminal_stderr() is sys.stderr


def test_an_unwritable_log_warns_once_and_the_output_goes_on(tmp_path, capsys):
    (tmp_path / "logs").write_text("a file where the folder would be")
    with run_log.captured_output():
        run_log.attach(tmp_path, 0)
        print("still shown")
        print("and this")
    out, err = capsys.readouterr()
    assert out == "still shown\nand this\n"
    assert err.count("warning: cannot write the run log") == 1 and "training goes on" in err


def test_a_failing_write_gives_up_the_log_but_not_the_console(tmp_path, capsys):
    with run_log.captured_output() as copy:
        run_log.attach(tmp_path, 0)
        print("kept")
        copy.file.close()  # as a vanished or full disk would fail it
        print("shown only")
        print("and this")
    out, err = capsys.readouterr()
    assert out == "kept\nshown only\nand this\n"
    assert err.count("warning: cannot write the run log") == 1
    assert _lines(tmp_path / "logs" / "process_0.log")[1:] == ["kept"]


def test_held_lines_are_bounded(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(run_log, "HELD_LINES", 3)
    with run_log.captured_output():
        for i in range(10):
            print(i)
        run_log.attach(tmp_path, 0)
    assert _lines(tmp_path / "logs" / "process_0.log")[1:] == ["7", "8", "9"]


def test_the_copied_streams_answer_as_the_console_does(tmp_path, capsys):
    with run_log.captured_output() as copy:
        assert sys.stdout.writable() and sys.stdout.errors == copy.terminal_stdout.errors
        stream = sys.stderr  # kept by a writer, as a logging handler keeps its stream
        run_log.attach(tmp_path, 0)
    stream.write("after the capture\n")  # reaches the console, and nothing holds it
    assert copy.held is None and capsys.readouterr().err == "after the capture\n"
    assert "after the capture" not in (tmp_path / "logs" / "process_0.log").read_text()


HUNG_LOG = """
import os, sys, threading, time
from mpt_jax import run_log
from mpt_jax.resilience import Watchdog
fifo = sys.argv[1]
reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read: writes block when full
with run_log.captured_output():
    run_log.attach(os.path.dirname(os.path.dirname(fifo)), 0)
    threading.Thread(target=lambda: print("x" * 300_000), daemon=True).start()
    time.sleep(0.5)  # that print now blocks in the log, holding it
    dog = Watchdog(0.5)
    dog.heartbeat()
    time.sleep(60)
"""


def test_the_watchdog_exits_even_when_the_run_log_hangs(tmp_path):
    fifo = tmp_path / "logs" / "process_0.log"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", HUNG_LOG, str(fifo)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 75, done.stderr[-500:]
    assert time.monotonic() - started < 30  # the log gets 5 s, then the process exits
    assert "watchdog: no training step completed" in done.stderr
    assert "Thread" in done.stderr  # the stacks, on the console
