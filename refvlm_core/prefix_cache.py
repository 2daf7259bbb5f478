"""Prompt-prefix KV cache: every query starts with the same tokens (chat template and
system prompt, up to the first ``<image>`` slot), so their keys and values are computed
once and copied into each new query's cache; the prefill runs on the rest only.

Only positions before the first image / region slot are reused: there the input
embedding is the token's own row, so equal ids mean equal inputs. The cache belongs to
one model in inference: weights that change make it stale (``clear()``).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch


class PromptPrefixCache:
    def __init__(self, multimodal_ids: tuple[int, ...]):
        self.multimodal_ids = multimodal_ids
        self.ids: tuple[int, ...] = ()
        self.cache = None                  # the key/value cache (RefLLM.new_cache) of ``ids``

    def clear(self) -> None:
        self.ids, self.cache = (), None

    def reusable(self, input_ids: torch.Tensor) -> int:
        """How many leading tokens of input_ids [1, T] have their KV here (0: none)."""
        ids = input_ids[0].tolist()
        shared = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            shared += 1
        return min(shared, len(ids) - 1)   # the last prompt token always runs: its output is needed

    def start(self, input_ids: torch.Tensor, new_cache: Callable[[], object]) -> tuple[object, int]:
        """(a cache to prefill into, how many leading tokens it already holds);
        ``new_cache()`` makes an empty one (RefLLM.new_cache)."""
        shared = self.reusable(input_ids) if self.cache is not None else 0
        if shared == 0:
            return new_cache(), 0
        cache = copy.deepcopy(self.cache)
        if len(self.ids) > shared:
            cache.crop(shared - len(self.ids))
        return cache, shared

    def remember(self, input_ids: torch.Tensor, cache) -> None:
        """Keep the KV of the prompt's constant part (before its first multimodal slot)."""
        ids = input_ids[0].tolist()
        end = next((i for i, t in enumerate(ids) if t in self.multimodal_ids), len(ids) - 1)
        if end == 0 or tuple(ids[:end]) == self.ids:
            return
        kept = copy.deepcopy(cache)
        kept.crop(end - cache.get_seq_length())
        self.ids, self.cache = tuple(ids[:end]), kept
