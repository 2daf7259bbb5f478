"""Make ``import torchvision`` work on CPU-only torch installs.

On PyPI the only torchvision matching torch 2.13.0 is a CUDA build. With the CPU
build of torch its compiled extension (``torchvision/_C.so``) cannot load, so the
``torchvision::nms`` / ``torchvision::qnms`` operators are never defined and the
import fails in ``_meta_registrations`` with "operator torchvision::nms does not
exist". open_clip, timm and parts of transformers import torchvision, so they fail too.

The fix: declare the two operator schemas before torchvision is imported, and only
when its extension cannot load. torchvision then imports; its compiled ops
(``torchvision.ops.nms`` and friends) still raise, and nothing here uses them. Where
torch is a CUDA build the extension loads and nothing here runs.

``install_import_hook()`` arranges this lazily: a ``.pth`` file written into the
virtual environment by ``make setup`` calls it at interpreter start, and the hook
applies the fix the first time anything imports torchvision (so plain interpreter
start-up stays fast and does not import torch).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_applied = False


def _extension_loads() -> bool:
    """True when torchvision's compiled ops can be loaded into this torch."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision not installed: nothing to fix
    folder = Path(next(iter(spec.submodule_search_locations)))
    libraries = sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd"))
    if not libraries:
        return False
    try:
        torch.ops.load_library(str(libraries[0]))
    except (OSError, RuntimeError):
        return False
    return True


def apply() -> bool:
    """Define the missing torchvision operator schemas if needed; True if it did."""
    global _applied
    if _applied:
        return True
    if "torchvision" in sys.modules or _extension_loads():
        return False
    import torch

    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold, float scale, int zero_point) -> Tensor"
    )
    globals()["_library"] = library  # the schemas live as long as this object
    _applied = True
    return True


class _TorchvisionImportHook(importlib.abc.MetaPathFinder):
    """Runs :func:`apply` just before the first import of torchvision, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            apply()
        return None  # let the normal finders import it


def install_import_hook() -> None:
    if not any(isinstance(finder, _TorchvisionImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionImportHook())
