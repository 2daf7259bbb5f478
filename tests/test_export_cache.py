"""The export cache's key: what an export is made from. A saved model's key changes with its
weights and with its config; a preset's with its config; the same model gives the same key
(found again without loading it). Exporting on first use and reusing the export are run on
the shipped model in tests/ros/test_shipped_export.py."""
from __future__ import annotations

import json

import pytest
import torch

from refvlm_core.checkpoint import save_model
from refvlm_core.errors import ConfigError
from refvlm_export.cache import cached_export, model_key
from refvlm_export.onnx_export import load_export_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("model") / "tiny_saved"
    save_model(load_export_model("tiny", seed=0), folder)
    return folder


def test_key_follows_the_weights_and_the_config(saved, tmp_path):
    name, key = model_key(str(saved))
    assert name == "tiny_saved" and model_key(str(saved)) == (name, key)
    other = tmp_path / "tiny_saved"
    save_model(load_export_model("tiny", seed=1), other)  # other weights, same config
    assert model_key(str(other))[1] != key
    config = json.loads((saved / "config.json").read_text())
    save_model(load_export_model("tiny", seed=0), tmp_path / "same")
    assert model_key(str(tmp_path / "same"))[1] == key  # the same model saved again: found again
    config_changed = tmp_path / "same"
    (config_changed / "config.json").write_text(json.dumps({**config, "router_length": 9}))
    assert model_key(str(config_changed))[1] != key


def test_presets_and_refusals():
    assert model_key("tiny") == model_key("tiny") and model_key("tiny")[1] != model_key("nano")[1]
    with pytest.raises(ConfigError, match="neither a preset"):
        model_key("no/such/model")


def test_a_cached_export_is_found_again_without_exporting(tmp_path):
    name, key = model_key("tiny")
    folder = tmp_path / f"{name}-{key}"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")  # what a finished export leaves (checked at configure)
    said = []
    assert cached_export("tiny", tmp_path, say=said.append) == folder
    assert said == [f"export of tiny: reusing {folder}"]
