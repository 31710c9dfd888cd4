"""`mpt-jax train ... --max-restarts N`: run the trainer as a child and restart it after crashes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mpt_jax.checkpoint import committed_steps
from mpt_jax.loss_spikes import LOSS_SPIKE_EXIT_CODE

# a restart cannot help these
NO_RETRY_EXIT_CODES = {
    2: "bad config or data",
    LOSS_SPIKE_EXIT_CODE: "stopped for a loss spike or a lasting high loss",
}
MAX_BACKOFF_S = 300.0
STOP_GRACE_S = 600.0  # after a forwarded SIGTERM / SIGINT, then SIGKILL (a save takes less)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def supervise(
    child_argv: Sequence[str],
    *,
    run_dir: str | Path,
    max_restarts: int,
    backoff_s: float = 10.0,
    first_extra: Sequence[str] = (),
    stop_grace_s: float = STOP_GRACE_S,
    launcher: Sequence[str] = (sys.executable, "-m", "mpt_jax"),
    keep_record: bool = True,
) -> int:
    """Run `python -m mpt_jax <child_argv>` until it succeeds or has failed `max_restarts` times.

    The wait before a restart doubles after each failure without progress (a new checkpoint)
    and resets after one with progress; SIGTERM / SIGINT are passed on to the child (as SIGTERM)
    and end supervision (a child still running `stop_grace_s` later is killed; a stop during the
    wait before a restart ends it at once). `first_extra` (e.g. --overwrite) is added to every
    attempt until one has written the run folder's config.yaml. Each failure is printed and,
    with `keep_record` (process 0's supervisor, or the only one), appended to
    RUN_DIR/restarts.jsonl.
    """
    checkpoints = Path(run_dir) / "checkpoints"
    log_path = Path(run_dir) / "restarts.jsonl"
    child: subprocess.Popen | None = None
    stopping: float | None = None  # when the first stop signal came

    def forward(signum, frame):
        nonlocal stopping
        stopping = stopping or time.monotonic()
        if child is not None and child.poll() is None:
            # SIGTERM whatever came: a terminal's Ctrl-C has reached the child already (same
            # process group), and a second SIGINT would interrupt it before it saves
            child.send_signal(signal.SIGTERM)

    def wait_for_child() -> int:
        while True:
            try:
                return child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if stopping is not None and time.monotonic() - stopping > stop_grace_s:
                    print(
                        f"supervisor: trainer still running {stop_grace_s:.0f} s after the "
                        "stop signal; killing it",
                        file=sys.stderr,
                        flush=True,
                    )
                    child.kill()

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    restarts, delay = 0, backoff_s
    # first_extra (--overwrite) goes on until an attempt has set up the run folder (written its
    # config.yaml anew): one that died before would otherwise leave the old run in place
    config_before = _file_stamp(Path(run_dir) / "config.yaml")
    try:
        while True:
            stamp = _file_stamp(Path(run_dir) / "config.yaml")
            # a config.yaml gone (an --overwrite deletion that failed midway) is not set up
            set_up = stamp is not None and stamp != config_before
            extra = [] if set_up else list(first_extra)
            before = committed_steps(checkpoints)
            started = time.time()
            child = subprocess.Popen([*launcher, *child_argv, *extra])
            if stopping is not None:  # a stop that came while the child was starting
                child.send_signal(signal.SIGTERM)
            code = wait_for_child()
            if code == 0 or stopping is not None:
                return code if code >= 0 else 128 - code
            after = committed_steps(checkpoints)
            progressed = bool(after) and (not before or after[-1] > before[-1])
            delay = backoff_s if progressed else delay
            failure = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "attempt": restarts + 1,
                "failure": _describe(code),
                "seconds": round(time.time() - started, 1),
                "latest_checkpoint": after[-1] if after else None,
            }
            if code in NO_RETRY_EXIT_CODES:
                print(
                    f"supervisor: trainer {failure['failure']} ({NO_RETRY_EXIT_CODES[code]}); "
                    "not restarted: a restart would fail the same way",
                    file=sys.stderr,
                    flush=True,
                )
                # a config refused before the run folder was made: nothing to record it in
                if keep_record and Path(run_dir).is_dir():
                    _append(log_path, {**failure, "action": "not restarted"})
                return code
            if restarts >= max_restarts:
                print(
                    f"supervisor: trainer {failure['failure']}; giving up after {max_restarts} "
                    "restarts",
                    file=sys.stderr,
                    flush=True,
                )
                if keep_record:
                    _append(log_path, {**failure, "action": "gave up"})
                return code if code > 0 else 1
            restarts += 1
            print(
                f"supervisor: trainer {failure['failure']} after {failure['seconds']} s; "
                f"restart {restarts} of {max_restarts} in {delay:.0f} s from checkpoint "
                f"{failure['latest_checkpoint']}",
                file=sys.stderr,
                flush=True,
            )
            if keep_record:
                _append(log_path, {**failure, "action": f"restart in {delay:.1f} s"})
            deadline = time.monotonic() + delay
            while stopping is None and time.monotonic() < deadline:
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))
            if stopping is not None:
                return 128 + signal.SIGTERM
            delay = min(delay * 2, MAX_BACKOFF_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _append(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # a run_dir the trainer refused (a file, unwritable): said, not fatal
        print(f"supervisor: cannot record to {path}: {e.strerror or e}", file=sys.stderr)
