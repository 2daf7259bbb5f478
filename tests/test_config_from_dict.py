"""Both configs (the model's and the training run's) are read by one builder: the same
ConfigError, naming the field, for an unknown key, a section that is not a mapping and a
value of the wrong type; nested sections and tuples come out typed."""
from __future__ import annotations

import re

import pytest

from refvlm_core.config import ModelConfig, preset
from refvlm_core.errors import ConfigError
from refvlm_training.engine.config import config_from_dict

TRAIN_BASE = {"data": {"train": "shards"}}


def model_error(data: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        ModelConfig.from_dict(data)
    return str(caught.value)


def train_error(data: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({**TRAIN_BASE, **data})
    return str(caught.value)


def without_root(message: str, root: str) -> str:
    """The message with its config's name taken out, and the list of known fields (which
    differs per section) cut off."""
    return re.sub(r"; known: .*", "", message.replace(root, "<root>", 1))


def test_an_unknown_nested_field_reads_the_same_in_both_configs():
    model = model_error({"vision": {"bogus": 1}})
    train = train_error({"optim": {"bogus": 1}})
    assert model.startswith("config.vision: unknown field(s) ['bogus']; known: [")
    assert train.startswith("train config.optim: unknown field(s) ['bogus']; known: [")
    assert without_root(model, "config").replace("vision", "S") == without_root(train, "train config").replace(
        "optim", "S")


def test_an_unknown_top_level_field_reads_the_same_in_both_configs():
    assert without_root(model_error({"bogus": 1}), "config") == without_root(train_error({"bogus": 1}),
                                                                            "train config")


def test_a_section_that_is_not_a_mapping_reads_the_same_in_both_configs():
    model, train = model_error({"vision": [1]}), train_error({"optim": [1]})
    assert model == "config.vision must be a mapping (JSON object), got list"
    assert train == "train config.optim must be a mapping (JSON object), got list"


@pytest.mark.parametrize("model_data, train_data, expected", [
    ({"vision": {"image_size": "big"}}, {"optim": {"warmup_steps": "big"}}, "is 'big' (str); expected int"),
    ({"router_length": True}, {"steps": True}, "is True (bool); expected int"),
    ({"llm": {"max_new_tokens": 1.5}}, {"optim": {"warmup_steps": 1.5}}, "is 1.5 (float); expected int"),
    ({"system_prompt": 3}, {"out": 3}, "is 3 (int); expected str"),
])
def test_a_value_of_the_wrong_type_names_the_field_in_both_configs(model_data, train_data, expected):
    model, train = model_error(model_data), train_error(train_data)
    assert model.startswith("config: field ") and model.endswith(expected)
    assert train.startswith("train config: field ") and train.endswith(expected)


def test_field_paths_in_type_errors_are_dotted():
    assert model_error({"vision": {"image_size": "big"}}).startswith("config: field vision.image_size is")
    assert train_error({"optim": {"lr": "1e-4"}}) == "train config: field optim.lr is '1e-4' (str); expected float"


def test_nested_sections_tuples_and_optional_sections_are_built_typed():
    data = preset("tiny").to_dict()
    data["vision"]["convnext_stages"] = [0, 1, 2]  # JSON has no tuples
    config = ModelConfig.from_dict(data)
    assert config == preset("tiny") and config.vision.convnext_stages == (0, 1, 2)
    train = config_from_dict({**TRAIN_BASE, "optim": {"betas": [0.8, 0.9], "lr": 1}, "external_decoder": None})
    assert train.optim.betas == (0.8, 0.9) and train.optim.lr == 1 and train.external_decoder is None
    staged = config_from_dict({**TRAIN_BASE, "stage": 3, "external_decoder": {"unit": "mask", "kind": "sam"}})
    assert staged.external_decoder.kind == "sam"
