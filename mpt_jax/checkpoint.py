"""Orbax checkpoints of a run: async saves, retention, and resume from the newest readable step.

A step folder `RUN_DIR/checkpoints/<step>/` holds four Orbax items: `params` and `opt_state`
(sharded arrays, OCDBT), `counters` (step and skip counters as arrays) and `meta` (JSON: data
iterator position, RNG, tokens, the resolved config). Orbax writes each step under a temporary
name and renames it when complete, so a killed save never looks like a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mpt_jax.config import CheckpointConfig, ConfigError

ITEMS = ("params", "opt_state", "counters", "meta")
CORRUPT_DIR = "corrupt"  # unreadable steps are moved here (outside Orbax's step names)
DISCARDED_PREFIX = "discarded-"  # a step being deleted after a rollback past it
# With several processes the time backstop's decision is a collective, taken at steps process 0
# picks: about every 10 s or 1/20 of every_minutes, whichever is shorter, at the measured pace
TIME_CHECK_S = 10.0
TIME_CHECKS_PER_PERIOD = 20
MAX_TIME_CHECK_STEPS = 1000


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore_latest` returns."""

    step: int
    params: Any
    opt_state: Any
    counters: Any
    meta: dict[str, Any]


def committed_steps(directory: str | Path) -> list[int]:
    """Steps with a complete (renamed) folder under `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def _error_line(error: BaseException) -> str:
    """The first line of an exception, shortened: Orbax and TensorStore errors run long."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # Orbax wraps a failed TensorStore read in an error whose first line ends in the opening of
    # a multi-line spec ("See full TensorStore details: <bound method ... TensorStore({"); the
    # cause it chains is the line that says what went wrong
    if "See full TensorStore details" in text and error.__cause__ is not None:
        return _error_line(error.__cause__)
    # TensorStore appends the spec it was opening, a JSON object of a kilobyte or more, after
    # the cause ("... File too large [tensorstore_spec='{...}'] [os_error_code='27']"): without
    # it the cause is at the end, which the shortened line keeps
    # (a read names two specs: tensorstore_spec='...' and tensorstore_spec[1]='...')
    text = re.sub(r" ?\[tensorstore_spec(?:\[\d+\])?='[^']*'\]", "", text)
    return text if len(text) <= 300 else f"{text[:120]} ... {text[-170:]}"


class Checkpointer:
    """Saves and restores a run's state with an Orbax CheckpointManager.

    Step-based (`every`) and time-based (`every_minutes`) saves, the latest `keep` kept plus every
    `keep_every`-th step; saves are asynchronous unless `async_save` is off or `wait` is asked.
    `poll` records finished saves in `completed` (the seconds the loop was blocked, and in all).
    """

    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            keep_period=cfg.keep_every,
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=True,  # the leftovers of a save that was killed
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)
        if jax.process_index() == 0:  # a discard that was killed midway
            for leftover in self.directory.glob(f"{DISCARDED_PREFIX}*"):
                shutil.rmtree(leftover, ignore_errors=True)
        self._last_save = time.monotonic()
        self._checked: tuple[int, float] | None = None  # step and time of the last time check
        self._next_check = 0  # with several processes: the step of the next time check
        self._in_flight: tuple[int, float, float] | None = None  # step, start, blocked seconds
        # per finished save: its step, seconds the caller was blocked, seconds until on disk
        self.completed: list[dict[str, float]] = []

    # -- decisions -------------------------------------------------------------------------------

    def start_clock(self) -> None:
        """Count `every_minutes` from now: a restore or an init is no training time."""
        self._last_save = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether `step` should be saved: every N steps, or M minutes since the last save.

        Call on every step, on every process (with several processes some steps are collectives).
        """
        if self.cfg.every is not None and step % self.cfg.every == 0:
            return True
        if self.cfg.every_minutes is None:
            return False
        now = time.monotonic()
        period_s = 60.0 * self.cfg.every_minutes
        late = now - self._last_save >= period_s
        if jax.process_count() == 1:
            return late
        checked_step = -1 if self._checked is None else self._checked[0]
        if checked_step < step < self._next_check:  # (a rollback goes back: check at once)
            return False
        # clocks differ: process 0 decides for everyone, and when to look again
        from jax.experimental import multihost_utils

        gap = self._steps_to_next_check(step, now, period_s)
        decided = multihost_utils.broadcast_one_to_all(np.array([late, gap], np.int32))
        self._next_check = step + int(decided[1])
        return bool(decided[0])

    def _steps_to_next_check(self, step: int, now: float, period_s: float) -> int:
        """Steps for about min(TIME_CHECK_S, period / TIME_CHECKS_PER_PERIOD) at the pace since
        the last check (process 0's is the one used)."""
        previous, self._checked = self._checked, (step, now)
        if previous is None or step <= previous[0]:
            return 1
        step_s = max((now - previous[1]) / (step - previous[0]), 1e-6)
        target_s = min(TIME_CHECK_S, period_s / TIME_CHECKS_PER_PERIOD)
        return int(min(MAX_TIME_CHECK_STEPS, max(1, target_s // step_s)))

    # -- saving ----------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        params: Any,
        opt_state: Any,
        counters: Any,
        meta: Mapping[str, Any],
        wait: bool = False,
    ) -> None:
        """Start (or, with `wait`, complete) a save of `step`; a save in flight finishes first."""
        blocked_from = time.perf_counter()  # waiting for the previous save blocks the loop too
        if self._in_flight is not None:
            self.wait()
        self.check()
        if step in self._manager.all_steps():
            return
        start = time.perf_counter()
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            counters=ocp.args.StandardSave(counters),
            meta=ocp.args.JsonSave(dict(meta)),
        )
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as e:
            raise self._save_error(step, e) from e
        self._in_flight = (step, start, time.perf_counter() - blocked_from)
        self._last_save = time.monotonic()
        if wait or not self.cfg.async_save:
            self.wait()

    def _save_error(self, step: int, error: BaseException) -> CheckpointError:
        kept = ", ".join(map(str, committed_steps(self.directory))) or "none"
        return CheckpointError(
            f"{self.directory / str(step)}: saving the checkpoint failed ({_error_line(error)}); "
            f"the earlier checkpoints (steps {kept}) are intact"
        )

    def _failed_in_flight(self, error: BaseException) -> CheckpointError:
        """The error of the save in flight, which is then no longer tracked."""
        step = self._in_flight[0] if self._in_flight else -1
        self._in_flight = None
        return self._save_error(step, error)

    def check(self) -> None:
        """Raise the error of a failed background save, if any."""
        try:
            self._manager.check_for_errors()
        except Exception as e:
            raise self._failed_in_flight(e) from e

    def poll(self) -> None:
        """Record a save that has completed in the background (see `completed`)."""
        if self._in_flight is None or self._manager.is_saving_in_progress():
            return
        self.check()
        step, start, blocked = self._in_flight
        self._in_flight = None
        self.completed.append(
            {
                "checkpoint_step": step,
                "checkpoint_blocked_s": blocked,
                "checkpoint_save_s": time.perf_counter() - start,
            }
        )

    def wait(self) -> None:
        """Block until a save in flight is on disk."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._failed_in_flight(e) from e
        self.poll()

    def close(self) -> None:
        self._manager.close()

    # -- restoring -------------------------------------------------------------------------------

    def restore_latest(
        self,
        abstract: Mapping[str, Any],
        *,
        check_meta: Callable[[int, dict[str, Any]], None] | None = None,
        before: int | None = None,
    ) -> Restored | None:
        """The newest readable step (below `before` if given), or None when there is none.

        `abstract` maps params / opt_state / counters to trees of jax.ShapeDtypeStruct with the
        target shardings (any mesh: Orbax reshards). `check_meta` may reject a step whose meta
        does not fit this run (raising ConfigError; the step is not touched). A step that cannot
        be read is reported and the previous one is tried; once an older step has been read,
        the unreadable newer ones are moved to checkpoints/corrupt/. When no step can be read,
        nothing is moved and CheckpointError is raised: an error that strikes every step (a
        flaky filesystem, memory, a changed state tree) must not turn into a fresh start.
        """
        failed: list[tuple[int, BaseException]] = []
        steps = [s for s in self._manager.all_steps() if before is None or s < before]
        for step in sorted(steps, reverse=True):
            error: BaseException | None = None
            try:
                meta = read_meta(self.directory / str(step))
            except Exception as e:
                error = e
            if error is None:
                if check_meta is not None:
                    check_meta(step, meta)
                args = ocp.args.Composite(
                    **{k: ocp.args.StandardRestore(v) for k, v in abstract.items()}
                )
                try:
                    out = self._manager.restore(step, args=args)
                except Exception as e:
                    error = e
            error = _agreed_error(step, error)
            if error is not None:
                failed.append(self._unreadable(step, error))
                continue
            for bad, error in failed:
                self._quarantine(bad, error)
            return Restored(
                step, out.get("params"), out.get("opt_state"), out.get("counters"), meta
            )
        if failed:
            steps = ", ".join(str(step) for step, _ in failed)
            raise CheckpointError(
                f"{self.directory}: no checkpoint could be restored (steps {steps}; the newest "
                f"failed with {_error_line(failed[0][1])}); nothing was moved or deleted"
            )
        return None

    def discard_after(self, step: int) -> list[int]:
        """Delete the steps after `step`, newest first; returns them. Each is renamed out of the
        step names before it is removed, so a kill midway leaves no half-deleted checkpoint."""
        self.wait()
        doomed = sorted((s for s in self._manager.all_steps() if s > step), reverse=True)
        for late in doomed:
            if jax.process_index() == 0:
                target = self.directory / f"{DISCARDED_PREFIX}{late}"
                shutil.rmtree(target, ignore_errors=True)
                os.replace(self.directory / str(late), target)
                shutil.rmtree(target)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"mpt_jax discard {late}")
        if doomed:
            self._manager.reload()
        return doomed

    def _unreadable(self, step: int, error: BaseException) -> tuple[int, BaseException]:
        message = (
            f"checkpoint {self.directory / str(step)} is unreadable ({_error_line(error)}); "
            "trying the previous one"
        )
        if jax.process_count() == 1:
            _log(message)
        elif not isinstance(error, _UnreadableElsewhere) or jax.process_index() == 0:
            # each process that failed says why (it may be the only one that did)
            print(f"process {jax.process_index()}: {message}", file=sys.stderr, flush=True)
        return step, error

    def _quarantine(self, step: int, error: BaseException) -> None:
        target = self.directory / CORRUPT_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        _log(f"checkpoint {self.directory / str(step)} moved to {target} ({_error_line(error)})")
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.directory / str(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"mpt_jax quarantine {step}")
        self._manager.reload()


_BARRIER_MISMATCH = "sync_global_devices name mismatch"


class _UnreadableElsewhere(CheckpointError):
    """A step this process read but another could not (its own shards, its own filesystem)."""


def _agreed_error(step: int, error: BaseException | None) -> BaseException | None:
    """A step is restored only if every process read it: one that restores a step the others
    cannot would train alone and hang at its first collective."""
    if jax.process_count() == 1:
        return error
    from jax.experimental import multihost_utils

    # a process that read its shards waits in Orbax's closing barrier (by default jax's
    # sync_global_devices, a name-checked all-gather): one that failed to read meets it with a
    # barrier of another name, which ends both with a name mismatch error instead of a hang
    met_barrier = isinstance(error, AssertionError) and _BARRIER_MISMATCH in str(error)
    read_failed = error is not None and not met_barrier
    if read_failed:  # an AssertionError: it met Orbax's barrier, whose wait fails too
        with contextlib.suppress(AssertionError):
            multihost_utils.sync_global_devices(f"mpt_jax unreadable {step}")
    failed = multihost_utils.process_allgather(np.int32(read_failed))
    if read_failed or not failed.any():
        return error
    others = ", ".join(str(i) for i in np.flatnonzero(failed))
    return _UnreadableElsewhere(f"process {others} could not read it")


# ---------------------------------------------------------------------------------------------
# Weights only (init_from, from_pretrained of a run folder)


def find_step_dir(path: str | Path, step: int | None = None) -> Path:
    """The step folder of a run folder (latest, or `step`), or `path` itself if it is one."""
    path = Path(path)
    if (path / "params").is_dir() and path.name.isdigit():
        if step is not None and step != int(path.name):
            raise ConfigError(f"{path}: a step folder of step {path.name}, not of step {step}")
        return path
    checkpoints = path / "checkpoints"
    if not checkpoints.is_dir():
        raise ConfigError(
            f"{path}: neither a run folder (no checkpoints/) nor a checkpoint step folder"
        )
    steps = committed_steps(checkpoints)
    if step is not None:
        if step not in steps:
            raise ConfigError(f"{path}: no checkpoint at step {step} (steps: {steps or 'none'})")
        return checkpoints / str(step)
    if not steps:
        raise ConfigError(f"{checkpoints}: holds no complete checkpoint yet")
    return checkpoints / str(steps[-1])


def read_meta(step_dir: str | Path) -> dict[str, Any]:
    """The JSON `meta` item of a step folder."""
    path = Path(step_dir) / "meta" / "metadata"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({_error_line(e)})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: not an mpt_jax checkpoint")
    return meta


def load_params(step_dir: str | Path, abstract_params: Any, *, step_option: str = "") -> Any:
    """Restore only the params item of a step folder into `abstract_params` (shapes, shardings).

    `step_option` (`--step`): the option that picks a step; the error suggests an earlier one.
    """
    path = Path(step_dir).absolute() / "params"
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, abstract_params)
    except Exception as e:
        hint = _earlier_step_hint(path.parent, step_option) if step_option else ""
        raise CheckpointError(
            f"{path}: cannot restore the parameters ({_error_line(e)}){hint}"
        ) from e


def _earlier_step_hint(step_dir: Path, step_option: str) -> str:
    """Where to turn when a step is unreadable: the steps saved before it (as resuming does)."""
    step = int(step_dir.name)
    earlier = [s for s in committed_steps(step_dir.parent) if s < step]
    if not earlier:
        return f"; step {step} is unreadable and no earlier step is saved"
    return (
        f"; step {step} is unreadable: try an earlier one, {step_option} {earlier[-1]} "
        f"(earlier steps: {', '.join(map(str, earlier))})"
    )


def quiet_abandoned_writes() -> None:
    """Silence what Orbax's abandoned futures report at exit after a checkpoint error.

    A failed save or restore leaves its other futures unretrieved and their coroutines
    unawaited; asyncio's logs, the warnings and the "Exception ignored in" reports (a hundred
    lines and more) would bury the one error line the command prints last.
    """
    import logging
    import warnings

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")
    sys.unraisablehook = lambda unraisable: None
