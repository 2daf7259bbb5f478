"""The node's model load: the quantize parameter picks the LLM weights of a model_path
model (auto, the default: int8 on a CPU), and a preset keeps float weights."""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.timeout(180)]


def test_quantize_picks_the_llm_weights(tmp_path):
    import torch

    from refvlm_core.checkpoint import save_model
    from refvlm_core.errors import ConfigError
    from refvlm_core.predictor import Predictor
    from refvlm_ros.node import load_predictor
    from refvlm_ros.params import NodeParams

    torch.set_num_threads(1)
    save_model(Predictor.from_preset("tiny").model, tmp_path / "model")
    kinds = {}
    for quantize in ("auto", "none", "int8", None):
        chosen = {} if quantize is None else {"quantize": quantize}
        loaded = load_predictor(NodeParams(model_path=str(tmp_path / "model"), **chosen).validate())
        kinds[quantize] = (loaded.quantize, type(loaded.model.llm.causal_lm.lm_head).__name__)
    assert kinds[None] == kinds["auto"] == kinds["int8"] == ("int8", "Int8Linear")
    assert kinds["none"] == ("none", "Linear")
    assert load_predictor(NodeParams(model_preset="tiny", quantize="int8").validate()).quantize == "none"
    with pytest.raises(ConfigError, match="quantize='int4'"):
        NodeParams(quantize="int4").validate()
