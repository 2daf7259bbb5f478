"""Shared by the export tests: the tiny model exported once per test process."""
from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def tiny_export() -> tuple[object, Path]:
    """(tiny RefVLM seeded 0, folder with its ONNX export); removed at interpreter exit."""
    import atexit

    from refvlm_export.onnx_export import export_model, load_export_model

    torch.set_num_threads(1)
    model = load_export_model("tiny", seed=0).eval()
    folder = Path(tempfile.mkdtemp(prefix="refvlm_export_"))
    atexit.register(shutil.rmtree, folder, True)
    export_model(model, folder)
    return model, folder


def has_cuda() -> bool:
    return torch.cuda.is_available()
