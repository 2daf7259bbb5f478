"""Files that must never be torn (model folders, training checkpoints) go through one
atomic writer: a writer that fails or a process killed mid-write leaves the previous file
loadable."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from refvlm_core.atomic import atomic_write
from refvlm_core.errors import CheckpointError


def test_a_writer_that_fails_half_way_leaves_the_previous_file_and_no_temp_file(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"previous")

    def half_then_fail(name: str) -> None:
        Path(name).write_bytes(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_write_that_completes_replaces_the_file_and_creates_its_folder(tmp_path):
    target = tmp_path / "new" / "folder" / "file.json"
    atomic_write(target, lambda name: Path(name).write_text("{}"))
    assert target.read_text() == "{}" and sorted(p.name for p in target.parent.iterdir()) == ["file.json"]


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from refvlm_training.engine import train_state as ckpt

    class KilledWhilePickled:
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt.save_checkpoint(Path(sys.argv[1]), step=2, model_sd={}, optim_sd={}, scheduler_sd={}, rng_states=[{}],
                         loader_states=[{}], extra={"payload": KilledWhilePickled()})
""")


def test_a_training_checkpoint_killed_mid_write_leaves_the_previous_one_loadable(tmp_path):
    from refvlm_training.engine import train_state as ckpt

    path = ckpt.checkpoint_path(tmp_path)
    weights = {"w": torch.arange(6.0)}
    ckpt.save_checkpoint(path, step=1, model_sd=weights, optim_sd={}, scheduler_sd={}, rng_states=[{}],
                         loader_states=[{}])
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    state = ckpt.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], weights["w"])


def test_a_torn_training_checkpoint_is_refused_by_name(tmp_path):
    """What a non-atomic writer would leave behind: the loader says what to do with it."""
    from refvlm_training.engine import train_state as ckpt

    path = ckpt.checkpoint_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(CheckpointError, match="cannot be read .*delete it"):
        ckpt.load_checkpoint(path)


def test_a_model_folder_write_that_fails_leaves_the_previous_model_loadable(tmp_path):
    from refvlm_core.checkpoint import WEIGHTS_FILE, load_model, save_model, write_model_folder
    from refvlm_core.config import preset
    from refvlm_core.model import RefVLM

    torch.manual_seed(0)
    model = RefVLM.from_config(preset("tiny"))
    save_model(model, tmp_path)
    before = (tmp_path / WEIGHTS_FILE).read_bytes()
    with pytest.raises(ValueError, match="expected torch.Tensor"):
        write_model_folder(tmp_path, {"projector.w": "not a tensor"}, model, "full")
    assert (tmp_path / WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS_FILE]
    loaded = load_model(tmp_path)
    assert torch.equal(loaded.projector.net[0].weight, model.projector.net[0].weight)
