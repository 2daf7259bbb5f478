"""The evaluation runner end to end: the tiny-preset Predictor over SimWorld samples.

A forced-answer wrapper makes the real model emit the ground-truth TRP text (its real
decoders then decode the <REF>s), so text metrics must be perfect and every answer
valid TRP; the unforced model runs through `refvlm eval` on written shards."""
import json
import math

import numpy as np
import pytest
import torch

from refvlm_core.errors import InputError
from refvlm_training.evaluation import runner

EXPECTED_KEYS = {
    "caption": {"CIDEr", "BLEU-4", "METEOR"},
    "vqa": {"accuracy"},
    "pope": {"accuracy", "precision", "recall", "f1", "yes_ratio"},
    "rec": {"acc@0.5", "miou"},
    "res": {"ciou", "giou"},
    "reg": {"CIDEr", "BLEU-4", "METEOR"},
    "ig": {"all/miou", "all/ciou"},
    "gcg": {"ap50", "miou", "recall", "caption/CIDEr", "caption/METEOR", "caption/BLEU-4"},
    "freeform_ovd": {"map", "ap50"},
    "ovs": {"map", "ap50"},
    "keypoint": {"oks_ap", "oks_ap50", "pck@0.1"},
    "depth": {"absrel", "rmse", "delta1", "valid_images"},
}


@pytest.fixture(scope="module")
def predictor():
    from refvlm_core.predictor import Predictor

    torch.set_num_threads(1)
    return Predictor.from_preset("tiny")


@pytest.fixture(scope="module")
def samples():
    from refvlm_simworld import SimWorld, SimWorldConfig
    from refvlm_training.data.simworld import world_samples

    world = SimWorld(SimWorldConfig(seed=0, width=96, height=72), "test")
    return [s for index in range(3) for s in world_samples(world, index, max_per_task=1, conversations=0)]


class ForcedAnswers:
    """Runs the real Predictor, forcing its decoding to spell ``answers`` in call order."""

    def __init__(self, predictor, answers):
        self.predictor, self.answers = predictor, list(answers)
        self.tokenizer = predictor.model.llm.tokenizer

    def predict(self, image, prompt, visual_prompts=(), system=None):
        ids = self.tokenizer(self.answers.pop(0), add_special_tokens=False).input_ids
        script = ids + [self.tokenizer.convert_tokens_to_ids("<|im_end|>")]

        def force(step, logits):
            forced = torch.full_like(logits, -1e9)
            forced[0, script[min(step, len(script) - 1)]] = 0
            return forced
        return self.predictor.predict(image, prompt, visual_prompts, max_new_tokens=len(script) + 1,
                                      logits_hook=force, system=system)


def _forced_report(predictor, samples, task, limit=3):
    items = runner.eval_items(samples, task, limit)
    return runner.evaluate(ForcedAnswers(predictor, [i.answer.text for i in items]), samples, task, limit,
                           progress=False), items


@pytest.mark.parametrize("task", sorted(EXPECTED_KEYS))
def test_forced_ground_truth_answers_through_every_task(predictor, samples, task):
    report, items = _forced_report(predictor, samples, task)
    assert report.count == len(items) > 0
    assert EXPECTED_KEYS[task] | {"valid_trp"} <= set(report.metrics)
    assert all(math.isfinite(v) for v in report.metrics.values())
    assert report.metrics["valid_trp"] == 1.0
    record = report.predictions[0]
    assert record["trp_text"] == items[0].answer.text and record["errors"] == []
    if task in ("vqa", "pope"):
        assert report.metrics["accuracy"] == 1.0
    if task in ("caption", "reg"):  # the answers are the references
        assert report.metrics["BLEU-4"] == pytest.approx(1.0) and report.metrics["METEOR"] > 0.9
    if task in ("rec", "res", "ig", "keypoint"):  # every <REF> decoded by its unit's decoder
        assert all(r["objects"] >= 1 for r in report.predictions)


def test_eval_prompts_use_the_fixed_templates_and_ground_truth_slots(samples):
    from refvlm_training.data.templates import EVAL_TEMPLATES

    rec = runner.eval_items(samples, "rec", 1)[0]
    assert rec.prompt == EVAL_TEMPLATES["rec"].format(phrase=rec.answer.targets[0].phrase)
    ig = runner.eval_items(samples, "ig", 1)[0]
    assert ig.prompt.count("<region>") == len(ig.visual_prompts) == 1
    ovs = runner.eval_items(samples, "ovs", 1)[0]
    assert all(t.phrase in ovs.prompt for t in ovs.answer.targets)
    caption = runner.eval_items(samples, "caption")
    assert len(caption) == 3 and all(len(i.references) >= 1 for i in caption)  # one item per image
    pope = runner.eval_items(samples, "pope")
    assert pope and all(i.answer.text.lower().rstrip(".") in ("yes", "no") for i in pope)


def test_bad_inputs_say_what_to_do(predictor, samples):
    with pytest.raises(InputError, match="unknown evaluation task"):
        runner.eval_items(samples, "segmentation")
    with pytest.raises(InputError, match="no samples for evaluation task"):
        runner.evaluate(predictor, [s for s in samples if s.task == "rec"], "depth", progress=False)
    with pytest.raises(InputError, match="neither a preset"):
        runner.load_predictor("no/such/folder")
    with pytest.raises(InputError, match="simworld:SPLIT:N"):
        runner.load_samples("simworld:test")


def test_refvlm_eval_command_writes_report(tmp_path, capsys):
    from refvlm_cli.main import main
    from refvlm_simworld import SimWorldConfig
    from refvlm_training.data.simworld import write_split

    write_split("test", 1, tmp_path / "shards", SimWorldConfig(seed=1, width=96, height=72), progress=False,
                max_per_task=1, conversations=0)
    out = tmp_path / "rec.json"
    code = main(["eval", "--task", "rec", "--model", "tiny", "--data", str(tmp_path / "shards"),
                 "--out", str(out), "--limit", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "acc@0.5" in printed and "valid_trp" in printed
    report = json.loads(out.read_text())
    assert report["task"] == "rec" and report["model"] == "tiny" and report["count"] >= 1
    per_kind = {k for k in report["metrics"] if k.startswith(("acc@0.5/", "count/"))}
    assert set(report["metrics"]) - per_kind == {"acc@0.5", "miou", "valid_trp"} and per_kind
    assert all(np.isfinite(v) for v in report["metrics"].values())
    assert len(report["predictions"]) == report["count"]
    assert main(["eval", "--task", "rec", "--model", "tiny", "--data", str(tmp_path / "none")]) == 2
