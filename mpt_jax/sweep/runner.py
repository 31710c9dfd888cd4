"""Running a sweep's members: locally one after another, several at once on disjoint device
subsets, or as a SLURM job array over a plain list of launch commands.

Every member runs the trainer in its own process (`python -m mpt_jax train BASE key=value ...`),
so a crash or an out-of-memory member ends only itself, and an interrupted member resumes from its
latest checkpoint the next time the sweep runs. Finished members (RUN_DIR/complete.json with the
member's config, and its eval results when the sweep evaluates) are skipped.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from mpt_jax.atomic_write import write_atomic
from mpt_jax.config import ConfigError, with_defaults
from mpt_jax.sweep.spec import Member, Sweep

EVAL_FILE = "eval.json"


def eval_path(member: Member) -> Path:
    return member.run_dir / EVAL_FILE


def is_finished(sweep: Sweep, member: Member) -> bool:
    """Trained to the end with this member's config (and evaluated, if the sweep evaluates)."""
    if not (member.run_dir / "complete.json").is_file() or _config_changed(member):
        return False  # a changed sweep file: the trainer resumes or refuses, not the sweep
    return sweep.eval is None or eval_path(member).is_file()


def _config_changed(member: Member) -> bool:
    """The member's run folder holds another config than the sweep file now gives (or none)."""
    try:
        saved = yaml.safe_load((member.run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return True
    # a run written before a config field existed holds that field's default
    return with_defaults(saved) != member.config


def unresumable_change(member: Member) -> str | None:
    """Why a finished member whose config the sweep file changed cannot run again, if so: it
    saved no checkpoints to resume from, and training it anew would replace its results."""
    finished = (member.run_dir / "complete.json").is_file()
    if not finished or not _config_changed(member):
        return None
    from mpt_jax.checkpoint import committed_steps  # jax and Orbax: only when needed

    if committed_steps(member.run_dir / "checkpoints"):
        return None
    return (
        f"its config changed and its finished run ({member.run_dir}) saved no checkpoints to "
        "resume from; restore the sweep file, or delete the run folder to train it anew"
    )


def _set_aside_stale_results(member: Member) -> None:
    """Rename, not delete, what a member about to run again left: its eval.json (an earlier
    config's or checkpoint's), and complete.json too when the sweep file changed its config.

    The trainer then resumes from the checkpoints or refuses a change it cannot resume; the
    old results stay readable beside the new ones. (A finished member without checkpoints is
    not run again: `unresumable_change`.)
    """
    names = ("complete.json", EVAL_FILE) if _config_changed(member) else (EVAL_FILE,)
    for name in names:
        done = member.run_dir / name
        if done.exists():
            done.replace(done.with_name(f"{name}.before-sweep-change"))


def train_command(sweep: Sweep, member: Member, python: str = "python") -> list[str]:
    return [python, "-m", "mpt_jax", "train", str(sweep.base), *member.train_args()]


def eval_command(sweep: Sweep, member: Member, python: str = "python") -> list[str] | None:
    spec = sweep.eval
    if spec is None:
        return None
    cmd = [python, "-m", "mpt_jax", "eval", str(member.run_dir), "--no-progress"]
    if spec.tasks is not None:
        cmd += ["--tasks", str(spec.tasks)]
    if spec.gauntlet is not None:
        cmd += ["--gauntlet", str(spec.gauntlet)]
    if spec.data is not None:
        cmd += ["--data", spec.data]
        if spec.seq_lens:
            cmd += ["--seq-lens", ",".join(map(str, spec.seq_lens))]
    return [*cmd, "--batch-size", str(spec.batch_size), "--out", str(eval_path(member))]


def shell_line(sweep: Sweep, member: Member, python: str = "python") -> str:
    """One member as a shell command line: train, then evaluate (if configured)."""
    line = shlex.join(train_command(sweep, member, python))
    evaluation = eval_command(sweep, member, python)
    if evaluation is None:
        return line
    # a preempted trainer exits 0 too: evaluate only a finished run
    done = shlex.quote(str(member.run_dir / "complete.json"))
    return f"{line} && if test -f {done}; then {shlex.join(evaluation)}; fi"


def report_command(sweep: Sweep) -> str:
    """The command that collects this sweep's results (its out_dir named: it may be overridden)."""
    return (
        f"python tools/sweep.py {shlex.quote(str(sweep.path))} "
        f"--out-dir {shlex.quote(str(sweep.out_dir))} --report-only"
    )


# ---------------------------------------------------------------------------------------------
# SLURM


# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS
SLURM_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}")


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """The array's resources; bad values are refused here, not by sbatch after submission."""

    gpus_per_member: int = 1
    cpus_per_member: int = 8
    time: str = "24:00:00"
    max_concurrent: int | None = None  # the array's %N throttle
    partition: str | None = None

    def __post_init__(self) -> None:
        if self.gpus_per_member < 0:  # 0: a CPU cluster's array
            raise ConfigError(f"--gpus-per-member: must be >= 0, got {self.gpus_per_member}")
        counts = {
            "--cpus-per-member": self.cpus_per_member,
            "--max-concurrent": self.max_concurrent,
        }
        for flag, count in counts.items():
            if count is not None and count < 1:
                raise ConfigError(f"{flag}: must be >= 1, got {count}")
        if not SLURM_TIME.fullmatch(self.time):
            raise ConfigError(
                f"--time: {self.time!r} is not a SLURM time (minutes, MM:SS, HH:MM:SS, D-HH, "
                "D-HH:MM or D-HH:MM:SS)"
            )


def write_slurm(sweep: Sweep, options: SlurmOptions) -> tuple[Path, Path, list[int]]:
    """Write OUT/commands.txt (one line per member) and OUT/sweep.sbatch (a job array over the
    unfinished members); returns both paths and the array indices."""
    members = sweep.members
    todo = [i for i, m in enumerate(members) if not is_finished(sweep, m)]
    for i in todo:
        if (reason := unresumable_change(members[i])) is not None:
            raise ConfigError(f"member {members[i].name}: {reason}")
    for i in todo:
        # the array task's shell test sees only these files
        _set_aside_stale_results(members[i])
    # SLURM does not create the folder of --output: without it every task fails unlogged
    (sweep.out_dir / "logs").mkdir(parents=True, exist_ok=True)
    commands = sweep.out_dir / "commands.txt"
    write_atomic(commands, "".join(shell_line(sweep, m) + "\n" for m in members))
    write_atomic(sweep.out_dir / "run_dirs.txt", "".join(f"{m.run_dir}\n" for m in members))
    array = ",".join(map(str, todo)) or "0"
    if options.max_concurrent is not None:
        array += f"%{options.max_concurrent}"
    evaluated = "" if sweep.eval is None else f' && -f "$RUN_DIR/{EVAL_FILE}"'
    partition = f"#SBATCH --partition={options.partition}\n" if options.partition else ""
    gpus = f"#SBATCH --gpus-per-task={options.gpus_per_member}\n" if options.gpus_per_member else ""
    script = f"""#!/bin/bash
# Sweep {sweep.name} ({sweep.path}): {len(members)} members, one array task each, written by
# tools/sweep.py. Task i runs line i+1 of commands.txt; a task whose member is finished exits at
# once, and one stopped before the end (preemption, time limit) requeues itself and resumes from
# its latest checkpoint. Collect the results afterwards with:
#   {report_command(sweep)}
#SBATCH --job-name=sweep-{sweep.name}
#SBATCH --array={array}
#SBATCH --nodes=1
#SBATCH --ntasks=1
{gpus}#SBATCH --cpus-per-task={options.cpus_per_member}
#SBATCH --time={options.time}
{partition}#SBATCH --requeue
#SBATCH --signal=B:TERM@300
#SBATCH --open-mode=append
#SBATCH --output={sweep.out_dir}/logs/slurm-%A_%a.out
set -uo pipefail
cd {shlex.quote(os.getcwd())}
LINE=$((SLURM_ARRAY_TASK_ID + 1))
RUN_DIR=$(sed -n "${{LINE}}p" {shlex.quote(str(sweep.out_dir / "run_dirs.txt"))})
finished() {{ [[ -f "$RUN_DIR/complete.json"{evaluated} ]]; }}
if finished; then
  echo "member $SLURM_ARRAY_TASK_ID finished: $RUN_DIR"
  exit 0
fi
# job control puts the member in its own process group: SLURM's TERM is passed to all of it
set -m
bash -c "$(sed -n "${{LINE}}p" {shlex.quote(str(commands))})" &
child=$!
trap 'kill -TERM -- "-$child" 2>/dev/null' TERM
wait "$child"; status=$?
if [[ $status -gt 128 ]]; then wait "$child"; status=$?; fi
if finished; then
  exit 0
elif [[ $status -eq 0 ]]; then  # stopped at a checkpoint (preemption, time limit)
  echo "member $SLURM_ARRAY_TASK_ID stopped before the end: requeueing"
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
  exit 0
fi
echo "member $SLURM_ARRAY_TASK_ID failed (exit $status): see the log above"
exit $status
"""
    sbatch = sweep.out_dir / "sweep.sbatch"
    write_atomic(sbatch, script, mode=0o755)
    return commands, sbatch, todo


# ---------------------------------------------------------------------------------------------
# Local runs


@dataclasses.dataclass(frozen=True)
class DeviceGroup:
    """The devices one member may use: GPU ids (CUDA_VISIBLE_DEVICES) or CPU cores (affinity)."""

    kind: str  # "gpu", "cpu" or "all" (no restriction)
    ids: tuple[int, ...] = ()

    def env(self) -> dict[str, str]:
        if self.kind == "gpu":
            return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.ids))}
        return {}

    def preexec(self) -> Callable[[], None] | None:
        if self.kind != "cpu":
            return None
        cores = set(self.ids)
        return lambda: os.sched_setaffinity(0, cores)

    def __str__(self) -> str:
        return "all devices" if self.kind == "all" else f"{self.kind} {_ranges(self.ids)}"


def _ranges(ids: Sequence[int]) -> str:
    return ",".join(map(str, ids))


def visible_gpus() -> list[int]:
    """GPU ids this process may hand out: CUDA_VISIBLE_DEVICES, else those nvidia-smi lists."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = []
        for entry in (x.strip() for x in listed.split(",")):
            if entry.isdigit():
                ids.append(int(entry))
            elif entry.startswith(("GPU-", "MIG-")):
                raise ConfigError(
                    f"CUDA_VISIBLE_DEVICES={listed!r}: --parallel hands out GPUs by index; "
                    "give indices, not UUIDs"
                )
            else:
                break  # as CUDA: the list ends at the first invalid entry (-1: no GPU at all)
        return ids
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    # "GPU 3: NVIDIA H100 ... (UUID: ...)"; MIG devices are indented lines of their own
    return [int(m.group(1)) for m in re.finditer(r"^GPU (\d+):", out, re.MULTILINE)]


def device_groups(parallel: int, gpus: Sequence[int] | None = None) -> list[DeviceGroup]:
    """`parallel` disjoint, equal device subsets: GPUs when there are any, else CPU cores."""
    if parallel < 1:
        raise ConfigError(f"--parallel: must be >= 1, got {parallel}")
    if parallel == 1 and gpus is None:
        return [DeviceGroup("all")]
    pool, kind = (list(gpus), "gpu") if gpus is not None else (visible_gpus(), "gpu")
    if not pool:
        pool, kind = sorted(os.sched_getaffinity(0)), "cpu"
    if len(pool) < parallel:
        raise ConfigError(
            f"--parallel: {parallel} members at once need at least {parallel} {kind} devices, "
            f"{len(pool)} available ({_ranges(pool)})"
        )
    size = len(pool) // parallel
    return [DeviceGroup(kind, tuple(pool[i * size : (i + 1) * size])) for i in range(parallel)]


class LocalRunner:
    """Runs members on device groups, several at once; SIGTERM/SIGINT stop it cleanly."""

    def __init__(self, sweep: Sweep, groups: Sequence[DeviceGroup], log: Callable[[str], None]):
        self.sweep = sweep
        self.groups = list(groups)
        self.log = log
        self.stopping = threading.Event()
        self._children: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.logs = sweep.out_dir / "logs"

    def run(self, members: Sequence[Member]) -> dict[str, str]:
        """Train (and evaluate) `members`; returns name -> finished / failed: ... / interrupted."""
        self.logs.mkdir(parents=True, exist_ok=True)
        todo: queue.Queue[Member] = queue.Queue()
        for member in members:
            todo.put(member)
        status: dict[str, str] = {m.name: "interrupted" for m in members}
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            workers = [
                threading.Thread(target=self._worker, args=(todo, group, status), daemon=True)
                for group in self.groups
            ]
            for w in workers:
                w.start()
            while any(w.is_alive() for w in workers):
                for w in workers:
                    w.join(timeout=0.2)  # short joins keep the main thread free for signals
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return status

    def _on_signal(self, signum: int, frame) -> None:
        if not self.stopping.is_set():
            self.log(
                f"{signal.Signals(signum).name}: stopping; running members save a checkpoint "
                "and stop (run the sweep again to resume)"
            )
        self.stopping.set()
        with self._lock:
            for child in self._children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)

    def _worker(self, todo: queue.Queue, group: DeviceGroup, status: dict[str, str]) -> None:
        while not self.stopping.is_set():
            try:
                member = todo.get_nowait()
            except queue.Empty:
                return
            try:
                status[member.name] = self._run_member(member, group)
            except Exception as error:  # the queue's other members still run
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                self.log(f"[{member.name}] failed: {message}")
                status[member.name] = f"failed: {message}"

    def _run_member(self, member: Member, group: DeviceGroup) -> str:
        sweep = self.sweep
        start = time.perf_counter()
        if (reason := unresumable_change(member)) is not None:
            self.log(f"[{member.name}] {reason}")
            return f"failed: {reason}"
        self.log(f"[{member.name}] training on {group}")
        _set_aside_stale_results(member)
        rc = self._call(train_command(sweep, member, sys.executable), member, "train", group)
        if rc != 0:
            return self._failed(member, "train", rc)
        if not (member.run_dir / "complete.json").is_file():
            self.log(f"[{member.name}] stopped before the end; it resumes on the next sweep run")
            return "interrupted"
        evaluation = eval_command(sweep, member, sys.executable)
        if evaluation is not None and not self.stopping.is_set():
            self.log(f"[{member.name}] evaluating")
            rc = self._call(evaluation, member, "eval", group)
            if rc != 0:
                return self._failed(member, "eval", rc)
        if not is_finished(sweep, member):
            return "interrupted"
        self.log(f"[{member.name}] finished in {time.perf_counter() - start:.0f} s")
        return "finished"

    def _failed(self, member: Member, stage: str, rc: int) -> str:
        if self.stopping.is_set():
            return "interrupted"
        log = self.logs / f"{member.name}.{stage}.log"
        last = _last_error_line(log)
        self.log(f"[{member.name}] {stage} failed (exit {rc}): {last} (log: {log})")
        return f"failed: {stage} exit {rc}: {last}"

    def _call(self, cmd: list[str], member: Member, stage: str, group: DeviceGroup) -> int:
        log_path = self.logs / f"{member.name}.{stage}.log"
        env = {**os.environ, **group.env()}
        with open(log_path, "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            with self._lock:
                if self.stopping.is_set():
                    return 0
                child = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    preexec_fn=group.preexec(),
                    start_new_session=True,  # signals reach it from this runner only, once
                )
                self._children.add(child)
            try:
                return child.wait()
            finally:
                with self._lock:
                    self._children.discard(child)


def _last_error_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if line.startswith("error:") or "Error" in line:
            return line[:300]
    return next((line[:300] for line in reversed(lines) if line), "no output")
