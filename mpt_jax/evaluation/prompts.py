"""Prompt assembly, few-shot sampling and tokenization exactly as llm-foundry's ICL datasets do.

Rules (llmfoundry/eval/datasets/in_context_learning_evaluation.py and utils.py):
- every string field of an example is stripped (`strip_dataset=True`); lists are left alone;
- few-shot examples are drawn per example with one `random.Random(fewshot_random_seed)` shared
  by the whole (sub-)dataset: `min(n - 1, k)` indices without replacement, never the example
  itself, iterated in Python set order;
- preamble = prompt_string + few-shot examples, each `[example_delimiter] + question_prelimiter +
  context + continuation_delimiter + answer` (the delimiter only after non-empty text);
- the example's own context follows the same pattern without the answer and is right-stripped,
  so a trailing space of continuation_delimiter is dropped; the continuation gets a leading space
  when the tokenizer needs one (' a' is a single token) and lacks it;
- preamble (with special tokens, a trailing EOS removed), context and continuation are tokenized
  separately and concatenated; contexts too long are cut from the left.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mpt_jax.evaluation.errors import EvalError
from mpt_jax.evaluation.tasks import GENERATION, LM, MC, SCHEMA, Example, TaskConfig
from mpt_jax.evaluation.tokens import IclTokenizer

# llm-foundry lets chain-of-thought answers run 10 tokens past the longest reference
COT_ANSWER_BUFFER = 10


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One example as text: the shared preamble, its context(s) and continuation(s)."""

    line: int
    preamble: str
    contexts: tuple[str, ...]  # schema: one per context option; otherwise one
    continuations: tuple[str, ...]  # multiple choice: one per choice; generation: none
    gold: int | None = None
    answers: tuple[str, ...] = ()  # generation: the answer and its aliases, unstripped


@dataclasses.dataclass(frozen=True)
class Scored:
    """Tokens to score: context then continuation, continuation from index `start`."""

    tokens: np.ndarray  # int32 (S,)
    start: int
    truncated: bool


def strip_fields(fields: dict) -> dict:
    """llm-foundry's strip_data: str.strip() on every string value."""
    return {k: v.strip() if isinstance(v, str) else v for k, v in fields.items()}


def fewshot_indices(n: int, k: int, example_index: int, rng: random.Random) -> list[int]:
    """llm-foundry's get_fewshot_sample_idxs, in the order its set iterates."""
    k = min(n - 1, k)
    chosen = set(rng.sample(range(n), k))
    if example_index in chosen:
        chosen.remove(example_index)
        if len(chosen) < n - 1:
            replacement = rng.choice(range(n))
            while replacement in chosen or replacement == example_index:
                replacement = rng.choice(range(n))
            chosen.add(replacement)
    return list(chosen)


class PromptBuilder:
    """Text prompts of one (sub-)dataset of a task at one few-shot count."""

    def __init__(self, task: TaskConfig, examples: Sequence[Example], *, prefix_space: bool):
        self.task = task
        self.kind = task.task_type
        self.prefix_space = prefix_space
        self.lines = [ex.line for ex in examples]
        self.raw = [ex.fields for ex in examples]
        self.examples = [strip_fields(ex.fields) for ex in examples]
        # chain of thought is on when any example has the field (a dataset column in llm-foundry)
        self.has_cot = self.kind == GENERATION and any("chain_of_thought" in f for f in self.raw)

    # -- pieces ------------------------------------------------------------------------------

    def _answer_in_context(self, ex: dict) -> str:
        if self.kind == MC:
            return ex["choices"][ex["gold"]]
        if self.kind == GENERATION:
            if self.has_cot:
                return f"{ex.get('chain_of_thought') or ''}{self.task.cot_delimiter}{ex['answer']}"
            return ex["answer"]
        return ex["continuation"]

    def _with_prefix_space(self, text: str) -> str:
        return f" {text}" if self.prefix_space and not text.startswith(" ") else text

    def _context(self, ex: dict, preceding: str, answer: bool) -> str:
        """construct_context: [delimiter] prelimiter context continuation_delimiter [answer]."""
        t = self.task
        if self.kind == SCHEMA:
            # the gold option stands in for the context; the prelimiter precedes the delimiter
            text = ex["context_options"][ex["gold"]]
            if preceding:
                text = f"{t.example_delimiter}{text}"
            return f"{t.question_prelimiter}{text}{t.continuation_delimiter}{ex['continuation']}"
        text = f"{t.question_prelimiter}{ex['query' if self.kind == MC else 'context']}"
        if preceding:
            text = f"{t.example_delimiter}{text}"
        text = f"{text}{t.continuation_delimiter}"
        return f"{text}{self._answer_in_context(ex)}" if answer else text

    def preamble(self, index: int, rng: random.Random, num_fewshot: int) -> str:
        """prompt_string followed by `num_fewshot` solved examples (never example `index`)."""
        text = self.task.prompt_string
        if num_fewshot > 0:
            for j in fewshot_indices(len(self.examples), num_fewshot, index, rng):
                text += self._context(self.examples[j], text, answer=True)
        return text

    def build(self, num_fewshot: int) -> list[Prompt]:
        """Every example's prompt; the few-shot generator advances example by example."""
        rng = random.Random(self.task.fewshot_random_seed)
        return [self._prompt(i, rng, num_fewshot) for i in range(len(self.examples))]

    def _prompt(self, i: int, rng: random.Random, num_fewshot: int) -> Prompt:
        ex, t = self.examples[i], self.task
        pre = self.preamble(i, rng, num_fewshot)
        if self.kind == SCHEMA:
            if pre:
                delim = t.continuation_delimiter.rstrip()
                contexts = tuple(
                    f"{t.question_prelimiter}{t.example_delimiter}{c}{delim}"
                    for c in ex["context_options"]
                )
            else:  # llm-foundry adds no continuation_delimiter here
                contexts = tuple(f"{t.question_prelimiter}{c}" for c in ex["context_options"])
            cont = (self._with_prefix_space(ex["continuation"]),)
            return Prompt(self.lines[i], pre, contexts, cont, gold=ex["gold"])
        context = (self._context(ex, pre, answer=False).rstrip(),)
        if self.kind == LM:
            cont = (self._with_prefix_space(ex["continuation"]),)
            return Prompt(self.lines[i], pre, context, cont)
        if self.kind == MC:
            choices = tuple(self._with_prefix_space(c) for c in ex["choices"])
            return Prompt(self.lines[i], pre, context, choices, gold=ex["gold"])
        raw = self.raw[i]  # llm-foundry collects aliases before stripping
        answers = tuple(dict.fromkeys([raw["answer"], *raw.get("aliases", [])]))
        return Prompt(self.lines[i], pre, context, (), answers=answers)

    def max_answer_tokens(self, tokenizer: IclTokenizer) -> int:
        """llm-foundry's max_new_tokens: the longest answer or alias (with CoT), +10 with CoT."""
        longest = 0
        for raw in self.raw:
            for answer in [raw["answer"], *raw.get("aliases", [])]:
                text = answer
                if self.has_cot:
                    text = f"{raw.get('chain_of_thought') or ''}{self.task.cot_delimiter}{answer}"
                longest = max(longest, tokenizer.count_with_specials(text))
        return longest + (COT_ANSWER_BUFFER if self.task.cot_delimiter else 0)


# ---------------------------------------------------------------------------------------------
# Tokenization


def trim_left(context: list[int], continuation: list[int], limit: int) -> tuple[list[int], bool]:
    """llm-foundry's trim_context: drop context tokens from the left until both fit `limit`."""
    if len(context) + len(continuation) <= limit:
        return context, False
    return context[len(context) + len(continuation) - limit :], True


def tokenize(
    prompt: Prompt, tokenizer: IclTokenizer, max_seq_len: int, path: str | Path
) -> list[Scored]:
    """Scored sequences of one example: one per choice (MC), context option (schema) or one."""
    preamble = tokenizer.encode_preamble(prompt.preamble)
    contexts = [preamble + tokenizer.encode(c) for c in prompt.contexts]
    continuations = [tokenizer.encode(c) for c in prompt.continuations]
    if len(contexts) == 1:
        contexts = contexts * len(continuations)
    elif len(continuations) == 1:
        continuations = continuations * len(contexts)
    out = []
    for context, continuation in zip(contexts, continuations, strict=True):
        if not continuation:
            raise EvalError(f"{path} line {prompt.line}: the continuation is empty")
        if len(continuation) > max_seq_len - 1:
            raise EvalError(
                f"{path} line {prompt.line}: a continuation of {len(continuation)} tokens leaves "
                f"no room for the context in the model's {max_seq_len}-token context"
            )
        context, cut = trim_left(context, continuation, max_seq_len)
        if not context:
            raise EvalError(f"{path} line {prompt.line}: the context is empty")
        tokens = np.asarray(context + continuation, np.int32)
        out.append(Scored(tokens, len(context), cut))
    return out


def tokenize_generation(
    prompt: Prompt, tokenizer: IclTokenizer, max_prompt_len: int, path: str | Path
) -> tuple[np.ndarray, bool]:
    """A generation prompt's tokens, cut from the left to `max_prompt_len` (llm-foundry's)."""
    tokens = tokenizer.encode_preamble(prompt.preamble) + tokenizer.encode(prompt.contexts[0])
    tokens, cut = trim_left(tokens, [], max_prompt_len)
    if not tokens:
        raise EvalError(f"{path} line {prompt.line}: the prompt is empty")
    return np.asarray(tokens, np.int32), cut
