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
    for command in ("trp", "infer", "data", "train", "eval", "export", "bringup", "demo"):
        assert command in done.stdout, f"`refvlm {command}` missing from --help"
