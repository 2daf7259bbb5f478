"""A model folder that cannot give sensible answers is refused at load time with a
CheckpointError naming the file and the field or weight: garbage or non-finite weights,
weights of another shape than the config builds, config fields of the wrong type.
Tiny preset, saved once per module."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from refvlm_core import checkpoint
from refvlm_core.errors import CheckpointError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    from refvlm_core.config import preset
    from refvlm_core.model import RefVLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    checkpoint.save_model(RefVLM.from_config(preset("tiny")), folder, mode="full")
    return folder


def copy_of(saved: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    return folder


def edit_config(folder: Path, edit) -> None:
    path = folder / checkpoint.CONFIG_FILE
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_the_saved_folder_loads(saved):
    checkpoint.load_model(saved)


def test_weights_overwritten_with_0xff_are_refused_naming_the_weight(saved, tmp_path):
    # Header kept, tensor bytes overwritten: 0xFFFFFFFF is a float32 NaN.
    folder = copy_of(saved, tmp_path)
    path = folder / checkpoint.WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    size = min(1 << 20, len(data) - header)
    data[header:header + size] = b"\xff" * size
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weight .* non-finite"):
        checkpoint.load_model(folder)


def test_a_file_of_0xff_is_refused(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    (folder / checkpoint.WEIGHTS_FILE).write_bytes(b"\xff" * (1 << 20))
    with pytest.raises(CheckpointError, match="corrupt or not safetensors"):
        checkpoint.load_model(folder)


def test_one_inf_weight_is_refused(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    path = folder / checkpoint.WEIGHTS_FILE
    tensors = load_file(path)
    key = next(k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1)
    tensors[key].view(-1)[0] = float("inf")
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=f"weight {key} has 1 non-finite"):
        checkpoint.load_model(folder)


def test_a_config_with_other_shapes_names_the_weight_and_the_config(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    edit_config(folder, lambda c: c["vision"]["convnext_custom"].update(dims=[8, 16, 32, 48]))
    with pytest.raises(CheckpointError, match=r"weight .* has shape .*config\.json builds"):
        checkpoint.load_model(folder)


@pytest.mark.parametrize("section, field, value", [
    ("vision", "image_size", "big"),
    ("llm", "max_new_tokens", 12.5),
    (None, "router_length", True),
    (None, "system_prompt", 3),
])
def test_a_config_field_of_the_wrong_type_names_the_file_and_field(saved, tmp_path, section, field, value):
    folder = copy_of(saved, tmp_path)
    edit_config(folder, lambda c: (c[section] if section else c).__setitem__(field, value))
    name = f"{section}.{field}" if section else field
    with pytest.raises(CheckpointError, match=rf"config\.json: field {name} is"):
        checkpoint.load_model(folder)
