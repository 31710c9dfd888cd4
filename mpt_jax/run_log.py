"""RUN_DIR/logs/process_<i>.log: a training process's console output, kept with its run.

What Python writes to `sys.stdout` and `sys.stderr` (prints, warnings, tracebacks) still goes to
the console and is copied, each line stamped with its UTC time, to the log file. Output from
before the file is known (the run folder is set up only after the config, data and model are
checked) is held in memory and written first. Native code's output (XLA's C++ logging) bypasses
Python's streams and reaches the console only. A log file that cannot be written (a full disk)
is given up with one warning; training goes on.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import io
import os
import shlex
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TextIO

HELD_LINES = 10_000  # before the file is attached; older ones are dropped


def log_path(run_dir: str | Path, process_index: int) -> Path:
    return Path(run_dir) / "logs" / f"process_{process_index}.log"


class _Copy(io.TextIOBase):
    """A text stream that writes to `target` and hands each complete line to `sink`."""

    def __init__(self, target: TextIO, sink: OutputCopy):
        self.target, self.sink, self.partial = target, sink, ""

    def write(self, text: str) -> int:
        written = self.target.write(text)
        self.sink.take(self, text)
        return written

    def flush(self) -> None:
        self.target.flush()

    def fileno(self) -> int:
        return self.target.fileno()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.target.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.target.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.target.errors

    def __getattr__(self, name: str):
        return getattr(self.target, name)


class OutputCopy:
    """Copies this process's Python stdout and stderr, line by line, to a log file."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.held: collections.deque[str] = collections.deque(maxlen=HELD_LINES)
        self.file: IO[str] | None = None
        self.path: Path | None = None
        self.terminal_stdout, self.terminal_stderr = sys.stdout, sys.stderr
        self.stdout = _Copy(sys.stdout, self)
        self.stderr = _Copy(sys.stderr, self)

    def install(self) -> None:
        sys.stdout, sys.stderr = self.stdout, self.stderr

    def uninstall(self) -> None:
        with self.lock:
            for stream in (self.stdout, self.stderr):
                if stream.partial:
                    self._line(stream.partial)
                    stream.partial = ""
            # only if nobody replaced them since (a test's capture, say)
            if sys.stdout is self.stdout:
                sys.stdout = self.terminal_stdout
            if sys.stderr is self.stderr:
                sys.stderr = self.terminal_stderr
            if self.file is not None:
                self.file.close()
            # a writer that kept the copied stream (a logging handler) writes to the console only
            self.file, self.held = None, None

    def take(self, stream: _Copy, text: str) -> None:
        with self.lock:
            *lines, stream.partial = (stream.partial + text).split("\n")
            for line in lines:
                # a carriage return redraws the line: keep what it finally showed
                self._line(line.rsplit("\r", 1)[-1])

    def note(self, line: str) -> None:
        """Write a line to the log file only (or hold it until the file is attached)."""
        with self.lock:
            self._line(line)

    def attach(self, path: Path, header: str) -> None:
        """Append to `path` from now on: `header`, then the lines held so far."""
        with self.lock:
            if self.file is not None or self.held is None:  # attached, or given up
                return
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in uninstall
            except OSError as e:
                self._give_up(path, e)
                return
            self.path = path
            held, self.held = list(self.held), None
            self._write(f"==== {_stamp()} {header} ====\n" + "".join(held))

    def _line(self, line: str) -> None:
        line = f"{_stamp()} {line}\n"
        if self.file is not None:
            self._write(line)
        elif self.held is not None:
            self.held.append(line)

    def _write(self, text: str) -> None:
        try:
            self.file.write(text)
            self.file.flush()
        except (OSError, ValueError) as e:  # ValueError: closed under us
            self._give_up(self.path, e)

    def _give_up(self, path: Path | None, error: Exception) -> None:
        with contextlib.suppress(Exception):
            if self.file is not None:
                self.file.close()
        self.file, self.held = None, None  # nothing more is kept
        print(
            f"warning: cannot write the run log {path}: {error}; it stops here, training goes on",
            file=self.terminal_stderr,
            flush=True,
        )


_active: OutputCopy | None = None


@contextlib.contextmanager
def captured_output() -> Iterator[OutputCopy]:
    """Copy stdout and stderr for a log file that `attach` names later; an inner use is a no-op.

    An exception that ends the block is written to the log before it propagates, since Python
    prints it only after the streams are restored.
    """
    global _active
    if _active is not None:
        yield _active
        return
    copy = _active = OutputCopy()
    copy.install()
    try:
        yield copy
    except BaseException as e:
        for line in "".join(traceback.format_exception(e)).rstrip("\n").split("\n"):
            copy.note(line)
        raise
    finally:
        _active = None
        copy.uninstall()


def attach(run_dir: str | Path, process_index: int, argv: list[str] | None = None) -> None:
    """Start writing the active copy (if any) to RUN_DIR/logs/process_<i>.log."""
    if _active is None:
        return
    argv = sys.orig_argv if argv is None else argv  # the interpreter's own, `-m mpt_jax` included
    header = f"start: pid {os.getpid()} on {socket.gethostname()}: {shlex.join(argv)}"
    _active.attach(log_path(run_dir, process_index), header)


def note(line: str) -> None:
    """Write a line to the active log only, not to the console."""
    if _active is not None:
        _active.note(line)


def terminal_stderr() -> TextIO:
    """The console's stderr, uncopied: for a progress bar, whose redraws a log would not want."""
    return _active.terminal_stderr if _active is not None else sys.stderr


def note_within(text: str, timeout_s: float, *, stacks: bool = False) -> None:
    """Write `text` (and all threads' stacks) to the log from another thread, waiting at most
    `timeout_s`: for a process about to exit, whose log may sit on a hung filesystem."""
    copy = _active
    if copy is None:
        return

    def write() -> None:
        with copy.lock:
            for line in text.split("\n"):
                copy.note(line)
            if stacks and copy.file is not None:
                with contextlib.suppress(Exception):
                    faulthandler.dump_traceback(file=copy.file, all_threads=True)

    writer = threading.Thread(target=write, name="run-log-last-words", daemon=True)
    writer.start()
    writer.join(timeout_s)


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
