"""llm-foundry's ICL task lists (YAML) and task files (JSON Lines), read unchanged and validated."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpt_jax.config import ConfigError, from_dict, load_yaml
from mpt_jax.evaluation.errors import EvalError

LM, MC, SCHEMA, GENERATION = (
    "language_modeling",
    "multiple_choice",
    "schema",
    "generation_task_with_answers",
)
TASK_TYPES = (LM, MC, SCHEMA, GENERATION)
# llm-foundry's name for generation_task_with_answers before v0.7
ALIASES = {"question_answering": GENERATION}
# the metric each type gets when `metric_names` is absent (llm-foundry's builders.py)
METRICS = {
    LM: "InContextLearningLMAccuracy",
    MC: "InContextLearningMultipleChoiceAccuracy",
    SCHEMA: "InContextLearningMultipleChoiceAccuracy",
    GENERATION: "InContextLearningGenerationExactMatchAccuracy",
}
# llm-foundry task keys this port does not implement: an error, never silently ignored
UNSUPPORTED_KEYS = {
    "pass_at_k": "code_evaluation",
    "num_beams": "code_evaluation",
    "generations_per_sample": "code_evaluation",
    "generation_kwargs": "custom generation settings",
    "hf_loading_vars": "Hugging Face hub datasets",
    "hf_parsing_map": "Hugging Face hub datasets",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """One entry of `icl_tasks:`; keys, meanings and defaults are llm-foundry's."""

    label: str
    dataset_uri: str
    num_fewshot: tuple[int, ...]
    icl_task_type: str
    prompt_string: str = ""
    example_delimiter: str = "\n"
    continuation_delimiter: str = " "
    question_prelimiter: str = ""
    cot_delimiter: str = ""
    early_stopping_criteria: tuple[str, ...] = ()
    do_normalization: bool = True
    has_categories: bool = False
    fewshot_random_seed: int = 1234
    metric_names: tuple[str, ...] | None = None
    batch_size: int | None = None
    max_seq_len: int | None = None

    def __post_init__(self) -> None:
        if any(n < 0 for n in self.num_fewshot) or not self.num_fewshot:
            raise ConfigError(
                f"num_fewshot: expected a non-empty list of counts >= 0, got {self.num_fewshot}"
            )
        twice = sorted({n for n in self.num_fewshot if self.num_fewshot.count(n) > 1})
        if twice:  # one result per task and shot count: a second would merge into the first
            raise ConfigError(f"num_fewshot: {twice[0]} is given twice in {list(self.num_fewshot)}")
        for name in ("batch_size", "max_seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1, got {value}")

    @property
    def task_type(self) -> str:
        return ALIASES.get(self.icl_task_type, self.icl_task_type)

    @property
    def path(self) -> Path:
        return Path(self.dataset_uri)


def parse_task(raw: Any, *, where: str, base: Path) -> TaskConfig:
    """Validate one task mapping; a relative dataset_uri is tried in the cwd, then beside `base`."""
    if not isinstance(raw, Mapping):
        raise EvalError(f"{where}: expected a mapping, got {raw!r}")
    raw = dict(raw)
    for key, what in UNSUPPORTED_KEYS.items():
        if key in raw:
            raise EvalError(f"{where}.{key}: not supported by mpt-jax eval ({what})")
    for key in ("label", "dataset_uri", "icl_task_type", "num_fewshot"):
        if key not in raw:
            raise EvalError(f"{where}: missing required key {key!r}")
    if isinstance(raw["num_fewshot"], int) and not isinstance(raw["num_fewshot"], bool):
        raw["num_fewshot"] = [raw["num_fewshot"]]
    try:
        task = from_dict(TaskConfig, raw, where=where)
    except EvalError:
        raise
    except ConfigError as e:
        msg = str(e)
        raise EvalError(msg if msg.startswith(where) else f"{where}.{msg}") from None
    kind = task.icl_task_type
    if task.task_type not in TASK_TYPES:
        hint = " (code evaluation is not supported)" if kind == "code_evaluation" else ""
        raise EvalError(
            f"{where}.icl_task_type: unknown task type {kind!r}{hint}; "
            f"known: {', '.join(TASK_TYPES)}"
        )
    if task.metric_names is not None and set(task.metric_names) != {METRICS[task.task_type]}:
        raise EvalError(
            f"{where}.metric_names: {kind} tasks compute {METRICS[task.task_type]} only, "
            f"got {list(task.metric_names)}"
        )
    if task.early_stopping_criteria:
        try:  # llm-foundry joins the criteria unescaped into one pattern
            re.compile("|".join(task.early_stopping_criteria))
        except re.error as e:
            raise EvalError(
                f"{where}.early_stopping_criteria: not a valid regular expression ({e})"
            ) from None
    uri = task.dataset_uri
    if "://" in uri:
        raise EvalError(f"{where}.dataset_uri: {uri}: only local files are supported")
    path = Path(uri)
    if not path.is_absolute() and not path.exists() and (base / path).exists():
        path = base / path
    if not path.is_file():
        raise EvalError(f"{where}.dataset_uri: {uri}: file not found")
    return dataclasses.replace(task, dataset_uri=str(path))


def load_task_list(path: str | Path) -> tuple[list[TaskConfig], dict[str, Any] | None]:
    """`icl_tasks:` of a YAML file (and its `eval_gauntlet:` section when it has one)."""
    path = Path(path)
    try:
        data = load_yaml(path)
    except ConfigError as e:
        raise EvalError(str(e)) from None
    unknown = sorted(set(data) - {"icl_tasks", "eval_gauntlet"})
    if unknown:
        raise EvalError(f"{path}: unknown top-level key {unknown[0]!r} (expected icl_tasks)")
    raw_tasks = data.get("icl_tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise EvalError(f"{path}: icl_tasks must be a non-empty list of tasks")
    tasks = [
        parse_task(t, where=f"{path} icl_tasks[{i}]", base=path.parent)
        for i, t in enumerate(raw_tasks)
    ]
    seen: set[str] = set()
    for task in tasks:
        if task.label in seen:
            raise EvalError(f"{path}: task label {task.label!r} appears twice")
        seen.add(task.label)
    return tasks, data.get("eval_gauntlet")


# ---------------------------------------------------------------------------------------------
# Task files


@dataclasses.dataclass(frozen=True)
class Example:
    """One JSON line of a task file with the line number it came from."""

    line: int
    fields: dict[str, Any]


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_fields(fields: dict[str, Any], task_type: str, need_category: bool) -> str | None:
    """What is wrong with one example of `task_type`, or None."""

    def want(key: str, ok: bool, what: str) -> str | None:
        if key not in fields:
            return f"missing field {key!r}"
        return None if ok else f"field {key!r} must be {what}, got {fields[key]!r}"

    checks: list[str | None] = []
    if task_type == LM:
        checks = [
            want("context", isinstance(fields.get("context"), str), "a string"),
            want("continuation", isinstance(fields.get("continuation"), str), "a string"),
        ]
    elif task_type in (MC, SCHEMA):
        key = "choices" if task_type == MC else "context_options"
        text = "query" if task_type == MC else "continuation"
        options = fields.get(key)
        checks = [
            want(text, isinstance(fields.get(text), str), "a string"),
            want(key, _is_str_list(options) and bool(options), "a non-empty list of strings"),
        ]
        gold = fields.get("gold")
        n = len(options) if isinstance(options, list) else 0
        is_int = isinstance(gold, int) and not isinstance(gold, bool)
        checks.append(want("gold", is_int and 0 <= gold < max(n, 1), f"an index into {key}"))
    elif task_type == GENERATION:
        checks = [
            want("context", isinstance(fields.get("context"), str), "a string"),
            want("answer", isinstance(fields.get("answer"), str), "a string"),
        ]
        if "aliases" in fields:
            checks.append(want("aliases", _is_str_list(fields["aliases"]), "a list of strings"))
        if "chain_of_thought" in fields:
            cot = fields["chain_of_thought"]
            checks.append(want("chain_of_thought", isinstance(cot, str), "a string"))
    if need_category:
        category = fields.get("category")
        checks.append(want("category", isinstance(category, str | int), "a string"))
    return next((c for c in checks if c), None)


def read_examples(
    path: str | Path, task_type: str, *, need_category: bool = False
) -> list[Example]:
    """Every JSON line of a task file, checked for the fields `task_type` reads."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise EvalError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    examples = []
    # "\n" only: str.splitlines also breaks at U+0085, U+2028 and U+2029, which JSON strings
    # may hold raw (llm-foundry's JSON Lines reader splits at newlines only)
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path} line {number}: invalid JSON ({e.msg})") from None
        if not isinstance(fields, dict):
            raise EvalError(f"{path} line {number}: expected a JSON object")
        problem = _check_fields(fields, task_type, need_category)
        if problem:
            raise EvalError(f"{path} line {number}: {problem} ({task_type} task)")
        examples.append(Example(number, fields))
    if not examples:
        raise EvalError(f"{path}: the task has no examples")
    return examples


def split_by_category(examples: list[Example]) -> dict[str, list[Example]]:
    """llm-foundry's has_categories: one sub-dataset per `category` value, sorted by name."""
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(str(ex.fields["category"]), []).append(ex)
    return dict(sorted(groups.items()))
