"""Faults seen from inside the trainer: preemption notices, a hang watchdog, injected faults."""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import sys
import threading
import time

from mpt_jax import run_log
from mpt_jax.config import ConfigError

WATCHDOG_EXIT_CODE = 75  # EX_TEMPFAIL: a hang, worth a restart
LAST_WORDS_TIMEOUT_S = 5.0  # for the watchdog's lines to reach the run log before it exits
FAULTS_ENV = "MPT_JAX_FAULTS"


class Preemption:
    """Notices SIGTERM / SIGINT and says at which step every process should stop.

    With several processes (jax.distributed) JAX's preemption sync point makes all of them agree
    on the step (SIGTERM; a SIGINT is turned into a SIGTERM to the process itself); a single
    process installs its own SIGTERM and SIGINT handlers (the sync point is inactive there). A
    second SIGINT interrupts at once.
    """

    def __init__(self) -> None:
        import jax

        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        # jax.distributed's preemption service owns SIGTERM there; never shadow its handler
        self._distributed = jax.process_count() > 1
        if threading.current_thread() is threading.main_thread():
            ours = (signal.SIGINT,) if self._distributed else (signal.SIGTERM, signal.SIGINT)
            for sig in ours:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if self._distributed:  # a notice the preemption service passes to every process
            print(
                "SIGINT received: passing it on as SIGTERM, so that every process stops at the "
                "same step and saves (a second SIGINT interrupts at once)",
                file=sys.stderr,
                flush=True,
            )
            os.kill(os.getpid(), signal.SIGTERM)
            return
        print(
            f"{self.signal_name} received: finishing the step in flight and saving a checkpoint",
            file=sys.stderr,
            flush=True,
        )

    def reached(self, step: int) -> bool:
        """Call after every step, on every process; True when training should stop here."""
        if self._distributed:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = "SIGTERM"
                return True
            return False
        return self.signal_name is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Watchdog:
    """Exits the process with WATCHDOG_EXIT_CODE and all Python stacks when heartbeats stop.

    Armed by a heartbeat; `disarm` leaves it unarmed until the next (compiling is no hang).
    """

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self._last: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if timeout_s is not None:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")
            self._thread.start()

    def heartbeat(self) -> None:
        self._last = time.monotonic()

    def disarm(self) -> None:
        """Unarmed until the next heartbeat (e.g. before a step that compiles)."""
        self._last = None

    def _watch(self) -> None:
        interval = min(5.0, max(0.05, self.timeout_s / 10))
        while not self._stop.wait(interval):
            last = self._last
            if last is None or time.monotonic() - last < self.timeout_s:
                continue
            message = (
                f"watchdog: no training step completed for {time.monotonic() - last:.0f} s "
                f"(limit {self.timeout_s:.0f} s, train.watchdog_minutes); a hung device or "
                "collective? Python stacks follow; exiting so a supervisor can restart"
            )
            # the console first and directly: the run log may be on the filesystem that hangs
            console = run_log.terminal_stderr()
            print(message, file=console, flush=True)
            faulthandler.dump_traceback(file=console, all_threads=True)
            console.flush()
            run_log.note_within(message, LAST_WORDS_TIMEOUT_S, stacks=True)
            os._exit(WATCHDOG_EXIT_CODE)

    def close(self) -> None:
        self._stop.set()


class InjectedFaults:
    """Fault drills from $MPT_JAX_FAULTS, e.g. `nan@5-7,hang@12,sigterm@9`.

    `nan@A-B`: data batches A..B (0-based, inclusive) give a NaN loss, as corrupt data would;
    `spike@A-B`: data batches A..B hold uniformly random tokens, as a shard of noise would (a
    loss spike once the model has learned something);
    `hang@N`: the host loop stops before step N (0-based) as a hung collective would;
    `sigterm@N`: the process sends itself SIGTERM before step N, as a preemption notice.
    Empty when the variable is unset.
    """

    def __init__(self, spec: str | None = None):
        spec = os.environ.get(FAULTS_ENV, "") if spec is None else spec
        self.nan_batches: set[int] = set()
        self.spike_batches: set[int] = set()
        self.hang_step: int | None = None
        self.sigterm_step: int | None = None
        for item in filter(None, (part.strip() for part in spec.split(","))):
            kind, _, where = item.partition("@")
            if kind not in ("nan", "spike", "hang", "sigterm"):
                raise ConfigError(
                    f"{FAULTS_ENV}: unknown fault {item!r} (nan, spike, hang or sigterm)"
                )
            ranged = kind in ("nan", "spike")
            form = f"{kind}@A-B or {kind}@A" if ranged else f"{kind}@N"
            pattern = r"(\d+)(?:-(\d+))?" if ranged else r"(\d+)()"
            match = re.fullmatch(pattern, where)
            if match is None:
                raise ConfigError(f"{FAULTS_ENV}: cannot parse {item!r} ({form})")
            lo = int(match.group(1))
            hi = int(match.group(2) or lo)
            if hi < lo:
                raise ConfigError(f"{FAULTS_ENV}: {item!r} is an empty range")
            if ranged:
                getattr(self, f"{kind}_batches").update(range(lo, hi + 1))
            elif getattr(self, f"{kind}_step") is not None:
                raise ConfigError(f"{FAULTS_ENV}: {kind} is given twice ({spec!r})")
            else:
                setattr(self, f"{kind}_step", lo)

    def before_step(self, step: int) -> None:
        if step == self.sigterm_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == self.hang_step:
            print(f"{FAULTS_ENV}: hanging before step {step}", file=sys.stderr, flush=True)
            threading.Event().wait()

    def poisons(self, batch_index: int) -> bool:
        return batch_index in self.nan_batches

    def scrambles(self, batch_index: int) -> bool:
        return batch_index in self.spike_batches
