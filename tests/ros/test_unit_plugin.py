"""Adding a visual unit is one file plus a registration (tests/point_unit.py): with no other
code change it trains, saves and loads, is allowed by the TRP grammar, predicts in
original pixels, and reaches the ROS message."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import point_unit
from model_samples import forced_answer_hook
from refvlm_core import trp
from refvlm_core.config import preset
from refvlm_core.sample import RefTarget, Sample, Turn

pytestmark = [pytest.mark.ros, pytest.mark.usefixtures("one_thread")]
H, W = 60, 80


@pytest.fixture
def point():
    yield point_unit.register()
    point_unit.unregister()


def _squares() -> tuple[np.ndarray, np.ndarray]:
    """An image with two squares and their xyxy boxes."""
    image = np.full((H, W, 3), 30, np.uint8)
    boxes = np.array([[8, 5, 30, 25], [40, 30, 70, 50]], np.float32)
    for (x0, y0, x1, y1), colour in zip(boxes.astype(int), ((220, 40, 40), (40, 40, 220))):
        image[y0:y1, x0:x1] = colour
    return image, boxes


def _point_error(result, centres: np.ndarray) -> float:
    """Mean pixel distance of the predicted points to the centres, best of both orders."""
    points = np.stack([o.outputs["point_xy"] for o in result.objects])
    return min(float(np.linalg.norm(points - c, axis=1).mean()) for c in (centres, centres[::-1]))


def test_a_plugin_unit_trains_loads_predicts_and_reaches_the_ros_message(point, tmp_path):
    from refvlm_core.checkpoint import load_model, save_model
    from refvlm_core.model import RefVLM
    from refvlm_core.predictor import Predictor
    from refvlm_ros.messages import result_to_msg
    from refvlm_training.engine.stages import set_stage_trainable
    from std_msgs.msg import Header

    config = preset("tiny")
    config.decoders[point] = {"hidden_dim": 32}
    torch.manual_seed(0)
    model = RefVLM.from_config(config)
    image, boxes = _squares()
    answer = f"There are {trp.format_phrase('squares', (point,), 2)}."
    sample = Sample("points", image, [Turn("user", "<image>\nWhere are the squares?"),
                                      Turn("assistant", answer, [RefTarget("squares", (point,), boxes=boxes)])], "rec")
    batch = model.processor.collate([model.processor.encode_sample(sample)])
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], -1)
    assert batch["targets"][point][0].value.shape == (2, 2)  # the decoder encoded its own targets

    def ask(m):
        predictor = Predictor(m)
        assert point in predictor.grammar().units  # generation may write the new unit
        return predictor.predict(image, "Where are the squares?", constrained=False,
                                 logits_hook=forced_answer_hook(m.llm.tokenizer, answer))

    before = _point_error(ask(model), centres)
    optimizer = torch.optim.AdamW(set_stage_trainable(model, 2), lr=3e-3)
    model.train()
    first = None
    for _ in range(40):
        losses = model(batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        first = first if first is not None else float(losses["loss_point"])
    assert float(losses["loss_point"]) < first / 3, (first, float(losses["loss_point"]))

    save_model(model, tmp_path)
    torch.manual_seed(0)  # tiny's "base LLM" is its seeded random init
    loaded = load_model(tmp_path)
    assert type(loaded.decoders[point]) is point_unit.PointDecoder
    result = ask(loaded)
    after = _point_error(result, centres)
    assert after < before / 2 and after < 8.0, (before, after)

    message = result_to_msg(result, Header(frame_id="camera"))
    outputs = [obj.outputs for obj in message.objects]
    assert [[o.name for o in out] for out in outputs] == [["point_xy"], ["point_xy"]]
    assert list(outputs[0][0].shape) == [2]
    assert np.allclose(outputs[0][0].values, result.objects[0].outputs["point_xy"], atol=1e-4)
    assert result.to_dict()["objects"][0]["outputs"]["point_xy"] == pytest.approx(
        result.objects[0].outputs["point_xy"].tolist(), abs=1e-3)
