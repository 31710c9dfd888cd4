"""The run log: RUN_DIR/logs/process_<i>.log copies a training process's console output."""

from __future__ import annotations

import re
import sys

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
    assert run_log.terminal_stderr() is sys.stderr and run_log.log_file() is None


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
