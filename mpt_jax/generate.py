"""Batched sampling with a KV cache: greedy, temperature, top-k, top-p, a seed, stop at EOS.

Prompts of different lengths are left-padded into one batch; the padding slots are masked out
of attention and learned positions count from each row's first real token. The prompt is
prefilled in one call, then one token per call; both are `jax.jit`-compiled once per shape
(batch, padded prompt length, cache length), and the lengths are rounded up to buckets so
that similar requests reuse the compiled programs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpt_jax.model import KVCache, MPTForCausalLM

PROMPT_BUCKET = 16  # padded prompt lengths are multiples of this
CACHE_BUCKET = 64  # KV cache lengths are multiples of this


class GenerationError(ValueError):
    """A request generate() cannot serve; the message names the argument at fault."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen; temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise GenerationError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k: must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p: must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def context_limit(model: MPTForCausalLM, max_seq_len: int | None = None) -> int:
    """Most positions (prompt + generated) a request may use: model.max_seq_len by default.

    ALiBi models may be given a larger max_seq_len (extrapolation, as MPT's model cards do by
    raising config.max_seq_len); learned position embeddings end at model.max_seq_len.
    """
    cfg = model.config
    if max_seq_len is None:
        return cfg.max_seq_len
    if max_seq_len < 1:
        raise GenerationError(f"max_seq_len: must be >= 1, got {max_seq_len}")
    if cfg.learned_pos_emb and max_seq_len > cfg.max_seq_len:
        raise GenerationError(
            f"max_seq_len: {max_seq_len} exceeds the model's learned position embeddings "
            f"({cfg.max_seq_len}); only ALiBi models can extrapolate"
        )
    return max_seq_len


def sample_next(logits_BV: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next token ids (B,) int32: argmax, or a sample after temperature, top-k and top-p."""
    if sampling.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
    neg_inf = jnp.finfo(jnp.float32).min
    V = logits_BV.shape[-1]
    if sampling.top_k is not None and sampling.top_k < V:
        kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
        # ties with the k-th logit stay in, as in transformers' TopKLogitsWarper
        logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)
    if sampling.top_p is not None and sampling.top_p < 1:
        # transformers' TopPLogitsWarper: in ascending order, drop the tokens whose cumulative
        # probability stays within 1 - top_p (never the most likely); by position, so of tokens
        # tied at the cut only as many stay as the mass needs
        order_BV = jnp.argsort(logits_BV, axis=-1)
        ascending_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
        mass_BV = jnp.cumsum(jax.nn.softmax(ascending_BV, axis=-1), axis=-1)
        drop_sorted_BV = (mass_BV <= 1 - sampling.top_p).at[:, -1].set(False)
        drop_BV = jnp.take_along_axis(drop_sorted_BV, jnp.argsort(order_BV, axis=-1), axis=-1)
        logits_BV = jnp.where(drop_BV, neg_inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _decode_and_sample(graphdef, state, ids_BS, cache: KVCache, key, step, sampling):
    """Feed ids_BS into the cache and choose the next token of every row."""
    model = nnx.merge(graphdef, state)
    logits_B1V, cache = model.decode(ids_BS, cache, last_only=True)
    next_B = sample_next(logits_B1V[:, 0], jax.random.fold_in(key, step), sampling)
    return next_B, cache


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[np.ndarray]:
    if isinstance(prompts, str | bytes) or not len(prompts):
        raise GenerationError("prompts: expected a non-empty list of token-id lists")
    rows = []
    for i, prompt in enumerate(prompts):
        row = np.asarray(prompt)
        if row.ndim != 1 or (row.size and not np.issubdtype(row.dtype, np.integer)):
            raise GenerationError(f"prompts[{i}]: expected a list of token ids")
        if row.size == 0:
            raise GenerationError(f"prompts[{i}]: is empty (a prompt needs at least one token)")
        if row.min() < 0 or row.max() >= vocab_size:
            raise GenerationError(
                f"prompts[{i}]: token ids must be in [0, {vocab_size}), "
                f"got {row.min()}..{row.max()}"
            )
        rows.append(row.astype(np.int32))
    return rows


def generate(
    model: MPTForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    max_seq_len: int | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens.

    Returns the new tokens of every row, cut before its first `eos_id` (a row shorter than
    max_new_tokens stopped at EOS). temperature 0 is greedy; otherwise logits are divided by
    the temperature, restricted to the top_k most likely tokens, then to the smallest set
    whose probability reaches top_p, and sampled with a key from `seed` (same seed, same
    tokens). A request longer than the context (see context_limit) is refused.
    """
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    rows = _check_prompts(prompts, model.config.vocab_size)
    limit = context_limit(model, max_seq_len)
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > limit:
        hint = " (ALiBi models may pass a larger max_seq_len)" if model.config.alibi else ""
        raise GenerationError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the "
            f"context of {limit} tokens (max_seq_len){hint}"
        )
    B = len(rows)
    P = _round_up(longest, PROMPT_BUCKET)
    # the last generated token is never fed back, hence the - 1
    T = _round_up(P + max_new_tokens - 1, CACHE_BUCKET)
    pad_B = np.asarray([P - len(r) for r in rows], np.int32)
    ids_BP = np.zeros((B, P), np.int32)
    for b, row in enumerate(rows):
        ids_BP[b, pad_B[b] :] = row

    graphdef, state = nnx.split(model)
    cache = model.init_cache(B, T, pad_lengths=pad_B)
    key = jax.random.key(seed)
    advance = functools.partial(_decode_and_sample, graphdef, state, key=key, sampling=sampling)
    next_B, cache = advance(jnp.asarray(ids_BP), cache, step=0)
    out = [next_B]
    done_B = np.zeros(B, bool)
    for t in range(1, max_new_tokens):
        if eos_id is not None:
            done_B |= np.asarray(next_B) == eos_id
            if done_B.all():
                break
        next_B, cache = advance(next_B[:, None], cache, step=t)
        out.append(next_B)
    tokens_BN = np.stack([np.asarray(t) for t in out], axis=1)
    results = []
    for row in tokens_BN.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        results.append(row)
    return results


def generate_text(model: MPTForCausalLM, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
    """Encode prompts, generate (stopping at the tokenizer's EOS) and decode the continuations."""
    ids = []
    for i, text in enumerate(prompts):
        row = np.asarray(tokenizer.encode(text)).tolist()
        if not row:
            raise GenerationError(f"prompt {i + 1} ({text!r}): encodes to no tokens")
        ids.append(row)
    kwargs.setdefault("eos_id", tokenizer.eos_id)
    return [tokenizer.decode(row) for row in generate(model, ids, **kwargs)]


def run_cli(args) -> None:
    """`mpt-jax generate`: load MODEL and its tokenizer, print one completion per --prompt."""
    from mpt_jax.loading import load_model_and_tokenizer

    if args.dtype not in ("float32", "bfloat16"):
        raise GenerationError(f"--dtype: must be float32 or bfloat16, got {args.dtype!r}")
    # the sampling arguments are checked before the (slow) model load
    SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    model, tokenizer = load_model_and_tokenizer(
        args.model,
        step=args.step,
        tokenizer=args.tokenizer,
        eos_token=args.eos_token,
        dtype=jnp.dtype(args.dtype),
    )
    completions = generate_text(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_seq_len=args.max_seq_len,
    )
    for i, text in enumerate(completions):
        if len(completions) > 1:
            print(f"=== completion {i + 1} ===")
        print(text)
