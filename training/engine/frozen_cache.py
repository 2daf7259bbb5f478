"""Outputs of frozen parts, computed once per image (or sample) and reused every epoch.

When the vision towers are frozen their features of an image never change: the cache
keeps them (keyed by the image's pixels), so each image goes through the towers once.
When everything before the decoders is frozen (towers, projector, LLM: a decoder-only
phase), the <REF> hidden states of a sample never change either: they are cached too
(keyed by the image and the token ids), so the LLM runs once per sample and later
epochs cost the decoders alone. Not an approximation: frozen parts run in eval mode
without dropout, so a cached output equals a recomputed one up to float rounding (the
batch it was computed in may differ).
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from refvlm_core.features import ImageFeatures


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class FrozenOutputsCache:
    """``features(model, batch)`` and ``ref_embeddings(model, batch, features)`` with memoisation."""

    def __init__(self, cache_refs: bool) -> None:
        self.cache_refs = cache_refs
        self._features: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._refs: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def image_keys(self, batch: dict[str, Any]) -> list[str]:
        return [_digest(image) for image in batch["images"]]

    @torch.no_grad()
    def features(self, model, batch: dict[str, Any], keys: list[str]) -> ImageFeatures:
        """``keys``: the batch's ``image_keys`` (computed once per step, shared with ref_embeddings)."""
        missing = [i for i, key in enumerate(keys) if key not in self._features]
        if missing:
            computed = model.encode_images(batch["images"][missing])
            for j, i in enumerate(missing):
                self._features[keys[i]] = (computed.patch_tokens[j].clone(),
                                           [level[j].clone() for level in computed.pyramid])
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        items = [self._features[key] for key in keys]
        return ImageFeatures(patch_tokens=torch.stack([tokens for tokens, _ in items]),
                             pyramid=[torch.stack([levels[k] for _, levels in items])
                                      for k in range(len(items[0][1]))])

    @torch.no_grad()
    def ref_embeddings(self, model, batch: dict[str, Any], features: ImageFeatures,
                       image_keys: list[str]) -> list[torch.Tensor]:
        """Per image [n_b, D] teacher-forced <REF> states, from the cache when every item is in it."""
        keys = [image + _digest(ids[mask.bool()]) for image, ids, mask
                in zip(image_keys, batch["input_ids"], batch["attention_mask"])]
        if not all(key in self._refs for key in keys):
            hidden = model.llm_hidden_states(batch, features)
            for key, refs in zip(keys, model.teacher_forced_refs(batch, hidden)):
                self._refs[key] = refs.clone()
        return [self._refs[key] for key in keys]
