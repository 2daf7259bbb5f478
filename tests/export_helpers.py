"""Shared by the export tests: the tiny model exported once per test process, with the
`refvlm export onnx` command (what a user runs)."""
from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def tiny_export() -> tuple[object, Path]:
    """(tiny RefVLM seeded 0, folder `refvlm export onnx --model tiny` wrote); removed at
    interpreter exit."""
    import atexit

    from refvlm_cli.main import main
    from refvlm_export.onnx_export import load_export_model

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="refvlm_export_"))
    atexit.register(shutil.rmtree, folder, True)
    assert main(["export", "onnx", "--model", "tiny", "--out", str(folder)]) == 0
    return load_export_model("tiny", seed=0).eval(), folder


def has_cuda() -> bool:
    return torch.cuda.is_available()
