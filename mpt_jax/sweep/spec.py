"""Sweep files: a base run config and axes (grid, zipped lists, explicit override sets, seeds),
expanded into members, each a validated run config with its own run folder."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mpt_jax.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    apply_overrides,
    load_yaml,
    parse_value,
    run_config_from_dict,
    to_dict,
)

SWEEP_KEYS = (
    "name",
    "base",
    "out_dir",
    "overrides",
    "grid",
    "zip",
    "members",
    "seeds",
    "eval",
    "reference",
)
EVAL_KEYS = ("tasks", "gauntlet", "batch_size", "data", "seq_lens")
SEED_KEY = "train.seed"
MAX_FILE_NAME_BYTES = 255  # NAME_MAX of Linux file systems


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """`mpt-jax eval` run on each member's final checkpoint (ICL tasks, gauntlet, perplexity)."""

    tasks: Path | None = None
    gauntlet: Path | None = None
    data: str | None = None
    seq_lens: tuple[int, ...] = ()
    batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class Member:
    """One training run of a sweep: its name, its overrides of the base config and its folder."""

    name: str
    params: dict[str, Any]  # swept keys -> values, seed included (what tables and plots show)
    overrides: dict[str, Any]  # every dotted override given to the trainer, run_dir last
    run_dir: Path
    config: dict[str, Any]  # the resolved run config, as the trainer writes RUN_DIR/config.yaml

    def train_args(self) -> list[str]:
        """The trainer's `key=value` arguments."""
        return [override_text(k, v) for k, v in self.overrides.items()]


@dataclasses.dataclass(frozen=True)
class Sweep:
    """An expanded sweep file."""

    name: str
    path: Path
    base: Path
    out_dir: Path
    axes: tuple[str, ...]  # the swept keys in file order (SEED_KEY last when seeds are given)
    members: tuple[Member, ...]
    eval: EvalSpec | None
    reference: str | None = None  # the member every other's loss curve is compared with


def load_sweep(path: str | Path, out_dir: str | Path | None = None) -> Sweep:
    """Read a sweep YAML, expand its members and validate every member's run config."""
    path = Path(path)
    spec = load_yaml(path)
    where = str(path)
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (expected one of {', '.join(SWEEP_KEYS)})"
        )
    if "base" not in spec:
        raise ConfigError(f"{where}: 'base' is missing (the run config the members start from)")
    base = (path.parent / str(spec["base"])).resolve()
    base_raw = load_yaml(base)
    name = str(_label(spec.get("name"), f"{where}: name") or path.stem)
    if out_dir is None:
        out_dir = spec.get("out_dir") or Path("runs") / "sweeps" / name
    out_dir = Path(out_dir).absolute()
    common = _dotted_mapping(spec.get("overrides") or {}, f"{where}: overrides")
    axes, choices = _axes(spec, where)
    if not choices:
        raise ConfigError(
            f"{where}: the sweep has no axes: give a grid, zip, members or seeds "
            "(a single run is `mpt-jax train`)"
        )
    for key in [*common, *axes]:
        _check_key(key, where)
    members: list[Member] = []
    seen: set[str] = set()
    for params in (_merge(combo) for combo in itertools.product(*choices)):
        label = params.pop("__label__", None)
        member_name = _member_name(params, label)
        if member_name in seen:
            raise ConfigError(
                f"{where}: two members have the same settings ({member_name}); "
                "remove the duplicate or give the member a distinct `name`"
            )
        seen.add(member_name)
        if len(f"{member_name}.train.log".encode()) > MAX_FILE_NAME_BYTES:
            raise ConfigError(
                f"{where}: member {member_name[:60]}...: its name ({len(member_name.encode())} "
                "bytes) is too long for its log file's name; set the long values in a `members:` "
                "entry with a short `name`"
            )
        run_dir = out_dir / "runs" / member_name
        overrides = {**common, **params, "run_dir": str(run_dir)}
        config = _resolve_member(base, base_raw, overrides, member_name)
        members.append(Member(member_name, params, overrides, run_dir, config))
    reference = _label(spec.get("reference"), f"{where}: reference")
    if reference is not None and str(reference) not in seen:
        raise ConfigError(
            f"{where}: reference: no member is named {reference!r} (members: {', '.join(seen)})"
        )
    return Sweep(
        name=name,
        path=path.resolve(),
        base=base,
        out_dir=out_dir,
        axes=tuple(axes),
        members=tuple(members),
        eval=_eval_spec(spec.get("eval"), path, where),
        reference=None if reference is None else str(reference),
    )


def _axes(spec: Mapping[str, Any], where: str) -> tuple[list[str], list[list[dict]]]:
    """The swept keys, and per axis the list of override sets it contributes."""
    axes: list[str] = []
    choices: list[list[dict]] = []
    for section in ("grid", "zip"):
        if section in spec and not spec[section]:
            raise ConfigError(f"{where}: {section}: empty (no axes); remove it or give axes")
    grid = _dotted_mapping(spec.get("grid") or {}, f"{where}: grid")
    for key, values in grid.items():
        values = _values(values, f"{where}: grid axis {key!r}")
        axes.append(key)
        choices.append([{key: v} for v in values])
    zips = spec.get("zip") or []
    for i, group in enumerate([zips] if isinstance(zips, Mapping) else zips):
        label = f"{where}: zip" + (f" group {i + 1}" if not isinstance(zips, Mapping) else "")
        group = _dotted_mapping(group, label)
        columns = {k: _values(v, f"{label} axis {k!r}") for k, v in group.items()}
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{k} has {n}" for k, n in lengths.items())
            raise ConfigError(f"{label}: lists must have the same length ({detail})")
        axes.extend(columns)
        if columns:
            rows = zip(*columns.values(), strict=True)
            choices.append([dict(zip(columns, row, strict=True)) for row in rows])
    if "members" in spec:
        sets = spec["members"]
        if not isinstance(sets, list) or not sets:
            raise ConfigError(f"{where}: members: expected a non-empty list of override mappings")
        parsed = []
        for i, entry in enumerate(sets):
            entry = _dotted_mapping(entry, f"{where}: members[{i}]")
            label = _label(entry.pop("name", None), f"{where}: members[{i}].name")
            axes.extend(k for k in entry if k not in axes)
            if label is not None:  # the label stands for this entry's keys in member names
                entry["__label__"] = (str(label), tuple(entry))
            parsed.append(entry)
        choices.append(parsed)
    if "seeds" in spec:
        seeds = _values(spec["seeds"], f"{where}: seeds")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"{where}: seeds: expected a list of integers, got {seeds!r}")
        if SEED_KEY in axes:
            raise ConfigError(f"{where}: seeds: {SEED_KEY} is also swept by an axis")
        axes.append(SEED_KEY)
        choices.append([{SEED_KEY: s} for s in seeds])
    return axes, choices


def _values(values: Any, where: str) -> list[Any]:
    if not isinstance(values, list):
        raise ConfigError(f"{where}: expected a list of values, got {values!r}")
    if not values:
        raise ConfigError(f"{where}: the list of values is empty")
    return values


def _dotted_mapping(value: Any, where: str) -> dict[str, Any]:
    """A mapping of dotted config keys; nested mappings are flattened (`optim: {lr: ..}`)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {value!r}")
    flat: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: key {key!r} is not a config key")
        entries = (
            {f"{key}.{sub}": v for sub, v in _dotted_mapping(item, where).items()}
            if isinstance(item, Mapping)
            else {key: item}
        )
        for dotted, v in entries.items():
            if dotted in flat:  # `optim: {lr: ..}` beside `optim.lr: ..`: one would be lost
                raise ConfigError(f"{where}: {dotted!r} is given twice (nested and dotted)")
            flat[dotted] = v
    return flat


def _merge(combo: Sequence[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in combo:
        out.update(part)
    return out


def _check_key(key: str, where: str) -> None:
    """A swept or overridden key must name a run config field (dataclass fields, walked)."""
    if key == "run_dir":
        raise ConfigError(f"{where}: run_dir is set per member (under out_dir); do not sweep it")
    node: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)} if node is not None else {}
        if node is ModelConfig and part == "preset":
            fields["preset"] = None
        if part not in fields:
            known = ", ".join(sorted(fields)) if fields else "none: it is not a section"
            raise ConfigError(
                f"{where}: {key!r} is not a config key ({'.'.join(parts[: i + 1])}: "
                f"known keys {known})"
            )
        hint = typing.get_type_hints(node).get(part)
        node = hint if dataclasses.is_dataclass(hint) else None


def _label(value: Any, where: str) -> str | None:
    """A name as written: YAML reads `1e-3` as 0.001, `010` as 8 and `yes` as True, which would
    name the folders otherwise."""
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}: {value!r} is not a string; quote the name ('...') to keep it")
    return value


def _member_name(params: Mapping[str, Any], label: tuple[str, tuple[str, ...]] | None) -> str:
    text, labelled = label if label is not None else ("", ())
    short = _short_keys(list(params))
    parts = []
    for key, value in params.items():
        if key not in labelled:
            parts.append(f"{short[key]}={_value_text(value)}")
        elif text not in parts:
            parts.append(text)
    if text and text not in parts:  # a member named but setting nothing (a baseline)
        parts.insert(0, text)
    name = re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", ",".join(parts)).strip("._")
    return name or "base"


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """The last component of each dotted key, or more of it where that would be ambiguous."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if sum(k == tail or k.endswith("." + tail) for k in keys) == 1:
                out[key] = tail
                break
        else:
            out[key] = key
    return out


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def override_text(key: str, value: Any) -> str:
    """A `key=value` trainer argument that `config.parse_value` reads back as `value`."""
    plain = isinstance(value, str) and parse_value(value) == value
    text = value if plain else json.dumps(value)
    if parse_value(text) != value:
        raise ConfigError(f"{key}: value {value!r} cannot be given on a command line")
    return f"{key}={text}"


def _resolve_member(
    base: Path, base_raw: dict, overrides: Mapping[str, Any], name: str
) -> dict[str, Any]:
    """The member's validated run config, resolved as the trainer resolves it."""
    args = [override_text(k, v) for k, v in overrides.items()]
    try:
        return to_dict(run_config_from_dict(apply_overrides(base_raw, args), where=str(base)))
    except ConfigError as e:
        raise ConfigError(f"sweep member {name}: {e}") from None


def _eval_spec(value: Any, path: Path, where: str) -> EvalSpec | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: eval: expected a mapping")
    unknown = sorted(set(value) - set(EVAL_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: eval: unknown key {unknown[0]!r} (expected one of {', '.join(EVAL_KEYS)})"
        )

    def file(key: str) -> Path | None:
        if value.get(key) is None:
            return None
        target = (path.parent / str(value[key])).resolve()
        if not target.is_file():
            raise ConfigError(f"{where}: eval.{key}: {target} does not exist")
        return target

    seq_lens = value.get("seq_lens") or []
    if not isinstance(seq_lens, list) or not all(isinstance(n, int) and n > 0 for n in seq_lens):
        raise ConfigError(f"{where}: eval.seq_lens: expected a list of positive integers")
    batch_size = value.get("batch_size", 16)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"{where}: eval.batch_size: expected a positive integer")
    spec = EvalSpec(
        tasks=file("tasks"),
        gauntlet=file("gauntlet"),
        data=None if value.get("data") is None else str(value["data"]),
        seq_lens=tuple(seq_lens),
        batch_size=batch_size,
    )
    if spec.tasks is None and spec.data is None:
        raise ConfigError(f"{where}: eval: give tasks (ICL task list) and/or data (perplexity)")
    if spec.gauntlet is not None and spec.tasks is None:
        raise ConfigError(f"{where}: eval.gauntlet: needs eval.tasks")
    return spec
