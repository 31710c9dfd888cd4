"""llm-foundry's eval gauntlet (llmfoundry/callbacks/eval_gauntlet_callback.py).

Benchmark score = accuracy, minus the random baseline (subtract_random_baseline), divided by
1 - baseline (rescale_accuracy); category score = weighted mean of its benchmarks (a category
with a missing benchmark is dropped, as llm-foundry does); each named average = plain mean of
the listed categories that have a score (0 if none); without `averages`, `default_average`
over all categories.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from mpt_jax.config import ConfigError, from_dict, load_yaml
from mpt_jax.evaluation.errors import EvalError

Weighting = Literal["EQUAL", "SAMPLE_SZ", "LOG_SAMPLE_SZ"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Benchmark:
    """A task label at one few-shot count and the accuracy of random guessing."""

    name: str
    num_fewshot: int
    random_baseline: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.random_baseline < 1.0:
            raise ConfigError(f"random_baseline: must be in [0, 1), got {self.random_baseline}")

    @property
    def key(self) -> str:
        return f"{self.name}/{self.num_fewshot}-shot"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Category:
    """A named group of benchmarks, averaged with the gauntlet's weighting."""

    name: str
    benchmarks: tuple[Benchmark, ...]

    def __post_init__(self) -> None:
        if not self.benchmarks:
            raise ConfigError(f"{self.name}: a category needs at least one benchmark")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GauntletConfig:
    """The `eval_gauntlet:` section."""

    weighting: Weighting = "EQUAL"
    subtract_random_baseline: bool = True
    rescale_accuracy: bool = True
    categories: tuple[Category, ...]
    averages: tuple[tuple[str, tuple[str, ...]], ...] | None = None

    def __post_init__(self) -> None:
        if self.rescale_accuracy and not self.subtract_random_baseline:
            raise ConfigError(
                "rescale_accuracy: only allowed together with subtract_random_baseline"
            )
        if not self.categories:  # would score 0 and look like a result
            raise ConfigError("categories: empty; a gauntlet needs at least one category")
        names = [c.name for c in self.categories]
        for name, _ in self.averages or ():
            if name in names:
                raise ConfigError(f"averages.{name}: an average may not share a category's name")

    def named_averages(self) -> dict[str, tuple[str, ...]]:
        if self.averages is None:
            return {"default_average": tuple(c.name for c in self.categories)}
        return dict(self.averages)


def parse_gauntlet(raw: Any, *, where: str) -> GauntletConfig:
    """Validate an `eval_gauntlet:` mapping (unknown keys and wrong types are errors)."""
    if not isinstance(raw, Mapping):
        raise EvalError(f"{where}: expected a mapping, got {raw!r}")
    raw = dict(raw)
    averages = raw.get("averages")
    if averages is not None:
        if not isinstance(averages, Mapping):
            raise EvalError(f"{where}.averages: expected a mapping of name -> category list")
        raw["averages"] = [[name, cats] for name, cats in averages.items()]
    try:
        cfg = from_dict(GauntletConfig, raw, where=where)
    except ConfigError as e:
        msg = str(e)
        raise EvalError(msg if msg.startswith(where) else f"{where}.{msg}") from None
    names = {c.name for c in cfg.categories}
    for avg, cats in cfg.named_averages().items():
        for cat in cats:
            if cat not in names:
                raise EvalError(f"{where}.averages.{avg}: unknown category {cat!r}")
    return cfg


def load_gauntlet(path: str | Path) -> GauntletConfig:
    """The `eval_gauntlet:` section of a YAML file (llm-foundry's eval_gauntlet_v0.*.yaml)."""
    try:
        data = load_yaml(path)
    except ConfigError as e:
        raise EvalError(str(e)) from None
    if "eval_gauntlet" not in data:
        raise EvalError(f"{path}: no eval_gauntlet section")
    return parse_gauntlet(data["eval_gauntlet"], where=f"{path} eval_gauntlet")


def _weight(cfg: GauntletConfig, bench: Benchmark, sizes: Mapping[str, int]) -> float:
    if cfg.weighting == "EQUAL":
        return 1.0
    # llm-foundry sums the sizes of every evaluator whose label starts with the benchmark key
    # (its has_categories sub-datasets)
    n = max(sum(v for k, v in sizes.items() if k.startswith(bench.key)), 1)
    return float(n) if cfg.weighting == "SAMPLE_SZ" else max(math.log2(n), 1.0)


def compute_gauntlet(
    cfg: GauntletConfig, accuracies: Mapping[str, float], sizes: Mapping[str, int]
) -> dict[str, Any]:
    """Category scores and named averages from accuracies keyed `label/N-shot`.

    `sizes` maps every evaluated (sub-)dataset label (`label/N-shot[/category]`) to its number
    of examples (the SAMPLE_SZ and LOG_SAMPLE_SZ weights).
    """
    categories: dict[str, float] = {}
    benchmarks: list[dict[str, Any]] = []
    missing: dict[str, list[str]] = {}
    for cat in cfg.categories:
        scored = []
        for bench in cat.benchmarks:
            if bench.key not in accuracies:
                missing.setdefault(cat.name, []).append(bench.key)
                continue
            score = accuracies[bench.key]
            if cfg.subtract_random_baseline:
                score -= bench.random_baseline
                if cfg.rescale_accuracy:
                    score /= 1.0 - bench.random_baseline
            weight = _weight(cfg, bench, sizes)
            scored.append((score, weight))
            benchmarks.append(
                {
                    "category": cat.name,
                    "benchmark": bench.key,
                    "accuracy": accuracies[bench.key],
                    "random_baseline": bench.random_baseline,
                    "score": score,
                    "weight": weight,
                }
            )
        if cat.name in missing:
            continue
        total = sum(w for _, w in scored)
        categories[cat.name] = sum(s * (w / total) for s, w in scored)
    averages = {}
    for name, cats in cfg.named_averages().items():
        present = [categories[c] for c in cats if c in categories]
        averages[name] = sum(present) / len(present) if present else 0.0
    return {
        "categories": categories,
        "averages": averages,
        "benchmarks": benchmarks,
        "missing": missing,
    }
