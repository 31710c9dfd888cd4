"""Joining a multi-process run with jax.distributed: explicit settings or cluster detection."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import sys
import time
from collections.abc import Mapping

from mpt_jax.config import ConfigError, DistributedConfig


class JoinError(RuntimeError):
    """The processes could not join (no coordinator, its port taken): worth a retry (exit 1),
    unlike a bad setting (ConfigError, exit 2)."""


ENV_PREFIX = "MPT_JAX_"  # MPT_JAX_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _LOCAL_DEVICE_IDS


def detected_cluster(env: Mapping[str, str] = os.environ) -> str | None:
    """The multi-process launcher JAX can read its settings from, if the run spans processes."""
    if _env_count(env, "SLURM_NTASKS") > 1 and "SLURM_STEP_NODELIST" in env:
        return "SLURM"
    if _env_count(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or _env_count(env, "MEGASCALE_NUM_SLICES") > 1:
        return "TPU pod"
    # an Indexed Job / JobSet pod; JAX reads its peers only through the kubernetes package
    # (jax[k8s]); without it the pod is one process (a Job of independent runs, say)
    pod = "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env
    if pod and importlib.util.find_spec("kubernetes") is not None:
        return "Kubernetes"
    return None


def _env_count(env: Mapping[str, str], name: str) -> int:
    """A launcher's process or slice count (1 when unset or empty)."""
    text = env.get(name, "").strip()
    if not text:
        return 1
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {text!r}") from None


def settings(cfg: DistributedConfig, env: Mapping[str, str] = os.environ) -> dict | None:
    """jax.distributed.initialize's arguments, or None for a single-process run."""
    address = cfg.coordinator_address or env.get(f"{ENV_PREFIX}COORDINATOR")
    count = cfg.num_processes or _int_env(env, "NUM_PROCESSES")
    index = cfg.process_id if cfg.process_id is not None else _int_env(env, "PROCESS_ID")
    local = cfg.local_device_ids
    if local is None and env.get(f"{ENV_PREFIX}LOCAL_DEVICE_IDS"):
        local = tuple(_int_list(env[f"{ENV_PREFIX}LOCAL_DEVICE_IDS"]))
    explicit = any(v is not None for v in (address, count, index))
    if not explicit and detected_cluster(env) is None:
        return None
    if explicit and (count is None or index is None or (address is None and count > 1)):
        raise ConfigError(
            "distributed: give coordinator_address, num_processes and process_id together "
            f"(or {ENV_PREFIX}COORDINATOR, {ENV_PREFIX}NUM_PROCESSES, {ENV_PREFIX}PROCESS_ID)"
        )
    if explicit:
        _check_explicit(cfg, address, count, index)
    if explicit and count == 1:
        return None
    return {
        "coordinator_address": address,
        "num_processes": count,
        "process_id": index,
        "local_device_ids": list(local) if local is not None else None,
        "initialization_timeout": cfg.initialization_timeout_s,
    }


# where each launcher JAX detects gives a process its index (TPU pods: the worker's in its slice)
_LAUNCHER_INDEX = {
    "SLURM": ("SLURM_PROCID",),
    "Open MPI": ("OMPI_COMM_WORLD_RANK",),
    "TPU pod": ("TPU_WORKER_ID", "MEGASCALE_SLICE_ID"),
    "Kubernetes": ("JOB_COMPLETION_INDEX",),
}


def is_process_zero(cfg: DistributedConfig, env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process will be process 0 (or the only one), known before joining."""
    kwargs = settings(cfg, env)
    if kwargs is None:
        return True
    if kwargs["process_id"] is not None:
        return kwargs["process_id"] == 0
    names = _LAUNCHER_INDEX.get(detected_cluster(env), ())
    return all(env.get(name, "0").strip() in ("", "0") for name in names)


def _check_explicit(cfg: DistributedConfig, address: str | None, count: int, index: int) -> None:
    """Refuse what JAX fails on late (a timeout) or with a traceback, naming the value's source."""
    count_from = "distributed.num_processes" if cfg.num_processes else f"{ENV_PREFIX}NUM_PROCESSES"
    if count < 1:
        raise ConfigError(f"{count_from}: must be >= 1, got {count}")
    if not 0 <= index < count:
        index_from = (
            "distributed.process_id" if cfg.process_id is not None else f"{ENV_PREFIX}PROCESS_ID"
        )
        raise ConfigError(
            f"{index_from}: must be in 0..{count - 1} for {count} processes ({count_from}), "
            f"got {index}"
        )
    if address is None:
        return
    host, _, port = address.rpartition(":")
    if not host or not re.fullmatch("[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        address_from = (
            "distributed.coordinator_address"
            if cfg.coordinator_address
            else f"{ENV_PREFIX}COORDINATOR"
        )
        raise ConfigError(
            f"{address_from}: expected host:port (process 0's, a port in 1..65535), got {address!r}"
        )


def initialize(cfg: DistributedConfig) -> bool:
    """Join the run's processes (before any other JAX call); False for a single process."""
    import jax

    kwargs = settings(cfg)
    if kwargs is None:
        return False
    address = kwargs["coordinator_address"]
    where = address or f"the {detected_cluster()} launcher's coordinator"
    if address and kwargs["process_id"] != 0:
        # JAX aborts the process (no exception) when registration times out: check first
        _wait_for_coordinator(address, kwargs["initialization_timeout"], kwargs)
    elif address:
        _check_port_free(address, kwargs)
    print(
        f"joining {where} as process {kwargs['process_id']} of {kwargs['num_processes']}",
        file=sys.stderr,
        flush=True,
    )
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # JAX raises plain RuntimeErrors / XlaRuntimeErrors here
        raise JoinError(
            f"distributed: could not join {where} as process {kwargs['process_id']} of "
            f"{kwargs['num_processes']} within {kwargs['initialization_timeout']} s "
            f"(distributed.initialization_timeout_s): {str(e).strip().splitlines()[0][:200]}"
        ) from e
    return True


def _wait_for_coordinator(address: str, timeout_s: float, kwargs: dict) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise JoinError(
                    f"distributed: could not join {address} as process {kwargs['process_id']} "
                    f"of {kwargs['num_processes']}: no coordinator answered within {timeout_s} s "
                    "(distributed.initialization_timeout_s; is process 0 running?)"
                ) from None
            time.sleep(0.5)


def _check_port_free(address: str, kwargs: dict) -> None:
    """Process 0 runs the coordinator on the address's port, on every interface: a port taken
    would otherwise cost the whole timeout and end in a message that does not say so."""
    port = int(address.rpartition(":")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # as the coordinator binds: a port in TIME_WAIT is free, one with a listener is not
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as e:
            raise JoinError(
                f"distributed: cannot run the coordinator of {address} as process 0 of "
                f"{kwargs['num_processes']}: port {port} is in use on this host ({e.strerror}; "
                "another run's coordinator, or a process of an earlier attempt still running?)"
            ) from None


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(f"{ENV_PREFIX}{name}")
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name}: expected an integer, got {value!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"{ENV_PREFIX}LOCAL_DEVICE_IDS: expected comma-separated integers, got {text!r}"
        ) from None
