"""Tokenizer calls exactly as llm-foundry's ICL datasets make them, over mpt_jax's tokenizers."""

from __future__ import annotations

from collections.abc import Sequence

from mpt_jax.data.tokenizer import ByteTokenizer, JsonTokenizer, open_whole_text


class IclTokenizer:
    """`encode` (no special tokens), `encode_preamble` (with them), prefix-space test, decode."""

    def __init__(self, tokenizer: ByteTokenizer | JsonTokenizer):
        self.base = tokenizer
        self.eos_id = int(tokenizer.eos_id)
        self.vocab_size = int(tokenizer.vocab_size)
        self._tok = None
        if isinstance(tokenizer, JsonTokenizer):
            # a private handle: mpt_jax's JsonTokenizer never adds special tokens, HF's
            # `tokenizer(text)` (used by llm-foundry for the preamble) does
            self._tok = open_whole_text(tokenizer.path)
        # llm-foundry's tokenizer_needs_prefix_space: ' a' is one token for GPT-2 style BPE
        self.needs_prefix_space = len(self.encode(" a")) == 1

    def encode(self, text: str) -> list[int]:
        """`tokenizer(text, add_special_tokens=False)['input_ids']`."""
        if self._tok is None:
            return list(text.encode("utf-8"))
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_preamble(self, text: str) -> list[int]:
        """`tokenizer(text)['input_ids']`, a trailing EOS dropped (_fix_eos_on_preamble)."""
        ids = self.encode(text) if self._tok is None else self._tok.encode(text).ids
        if len(ids) > 1 and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return ids

    def count_with_specials(self, text: str) -> int:
        """len(`tokenizer(text)['input_ids']`): llm-foundry sizes generation budgets with it."""
        if self._tok is None:
            return len(text.encode("utf-8"))
        return len(self._tok.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """`batch_decode(..., skip_special_tokens=True)` for one sequence."""
        if self._tok is None:
            return self.base.decode([i for i in ids if i < 256])
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
