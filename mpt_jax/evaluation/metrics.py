"""llm-foundry's ICL metrics (llmfoundry/eval/metrics/nlp.py) on per-example scores."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence

import numpy as np

# string.punctuation plus the quote marks llm-foundry's normalize_answer also removes
_PUNCTUATION = frozenset(string.punctuation + "‘’´`")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Underscores to spaces, lowercase, punctuation and articles to spaces, spaces collapsed."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in _PUNCTUATION else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split()).strip()


def final_answer(
    output: str, *, stopping_criteria: Sequence[str] = (), cot_delimiter: str = ""
) -> str:
    """The generated text up to the first stop sequence, after the last CoT delimiter."""
    if stopping_criteria:
        # llm-foundry joins the criteria into one regular expression, unescaped
        output = re.split("|".join(stopping_criteria), output)[0]
    if cot_delimiter:
        output = output.split(cot_delimiter)[-1]
    return output


def exact_match(
    output: str,
    answers: Iterable[str],
    *,
    stopping_criteria: Sequence[str] = (),
    cot_delimiter: str = "",
    do_normalization: bool = True,
) -> bool:
    """InContextLearningGenerationExactMatchAccuracy: the cleaned output starts with an answer."""
    answer = final_answer(output, stopping_criteria=stopping_criteria, cot_delimiter=cot_delimiter)
    clean = normalize_answer if do_normalization else str.strip
    cleaned = clean(answer)
    return any(cleaned.startswith(clean(label)) for label in answers)


def multiple_choice_pick(mean_ce: Sequence[float]) -> int:
    """InContextLearningMultipleChoiceAccuracy's choice: lowest perplexity, the first on ties."""
    perplexity = np.exp(np.asarray(mean_ce, np.float32))
    return int(np.argmin(perplexity))


def accuracy(correct: Sequence[bool]) -> float:
    """Correct over total."""
    return float(np.mean(np.asarray(correct, bool))) if len(correct) else float("nan")
