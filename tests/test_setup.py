"""The install works as `make setup` leaves it: pinned torch, the torchvision shim on
CPU-only torch, the libraries that import torchvision, and the `refvlm` command."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_fresh(code: str) -> subprocess.CompletedProcess:
    """A new interpreter, so the venv's start-up hook is what makes imports work."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_libraries_that_import_torchvision_work_in_a_fresh_interpreter():
    done = _run_fresh("import open_clip, timm\nfrom transformers import LlamaConfig\n"
                      "import torchvision\nprint(torchvision.__version__)")
    assert done.returncode == 0, done.stderr[-2000:]


def test_torch_is_the_pinned_version():
    import torch

    pinned = [line for line in (ROOT / "requirements/constraints.txt").read_text().splitlines()
              if line.startswith("torch==")]
    assert pinned == ["torch==2.13.0"]
    assert torch.__version__.split("+")[0] == "2.13.0"


def test_shim_defines_the_operators_only_when_the_extension_cannot_load():
    code = (
        "import refvlm_core.torchvision_compat as compat\n"
        "loads = compat._extension_loads()\n"
        "import torchvision\n"
        "print(loads, compat._applied)\n")
    done = _run_fresh(code)
    assert done.returncode == 0, done.stderr[-2000:]
    loads, applied = done.stdout.split()
    assert applied == ("False" if loads == "True" else "True")


def test_start_up_stays_light():
    """The .pth hook must not import torch at interpreter start."""
    done = _run_fresh("import sys; print('torch' in sys.modules)")
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_refvlm_help_lists_every_command_group():
    done = subprocess.run([sys.executable, "-m", "refvlm_cli.main", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("trp", "infer", "data", "train", "eval", "export", "bringup", "demo", "mcp"):
        assert command in done.stdout, f"`refvlm {command}` missing from --help"


def _package_folders() -> dict[str, str]:
    """setup.py's import name -> folder mapping, read from its source."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.Assign)
                and any(getattr(t, "id", None) == "IMPORT_NAME_TO_FOLDER" for t in n.targets))
    return ast.literal_eval(node.value)


def test_every_top_level_package_is_installed_from_its_folder(tmp_path):
    """A package folder at the root (e.g. simworld/) must be in setup.py's mapping, and the
    install must find it from anywhere (not only from the checkout's root)."""
    folders = _package_folders()
    assert sorted(folders.values()) == sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    print(importlib.import_module(name).__file__)"
    done = subprocess.run([sys.executable, "-c", code, *folders], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, f"run `make setup` after adding a package: {done.stderr[-2000:]}"
    for (name, folder), file in zip(folders.items(), done.stdout.split()):
        assert Path(file).resolve() == (ROOT / folder / "__init__.py").resolve(), name
