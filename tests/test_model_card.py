"""The model card: stage summaries from a run's logs and metrics checked against targets."""
from __future__ import annotations

import json

import pytest

from refvlm_core.errors import InputError
from refvlm_training.engine.config import config_from_dict
from refvlm_training.evaluation.model_card import NANO_TARGETS, main, metrics_table, render_card
from refvlm_training.evaluation.runner import EvalReport


def _write_stage(run, name, stage, steps, lora=False):
    folder = run / name
    folder.mkdir(parents=True)
    config = config_from_dict({"stage": stage, "data": {"train": "d"}, "batch_size": 8, "grad_accum": 2,
                               "optim": {"lr": 4e-4}, "lora": {"enabled": lora}})
    (folder / "train_config.json").write_text(json.dumps(config.to_dict()))
    lines = [{"step": s, "loss": 2.0 / s, "loss_lm": 1.0 / s, "loss_box_l1": 0.0, "seconds": 60.0 * s}
             for s in range(1, steps + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines)
                                          + json.dumps({"model_dir": "m", "steps": steps}) + "\n")


def test_card_reports_stages_and_which_targets_are_met(tmp_path):
    _write_stage(tmp_path, "stage1", 1, 3)
    _write_stage(tmp_path, "stage2", 2, 5, lora=True)
    EvalReport("rec", {"acc@0.5": 0.9, "miou": 0.7, "valid_trp": 1.0}, 100, 1.0).write_json(tmp_path / "eval-rec.json")
    EvalReport("depth", {"absrel": 0.2, "rmse": 0.5, "delta1": 0.7, "valid_trp": 0.95}, 50, 1.0).write_json(
        tmp_path / "eval-depth.json")
    card = render_card(tmp_path, "tools/train_nano.sh", 42.4, "SimWorld train, 10 scenes")
    assert "- stage1: 3 steps of batch 16 in 3 min, lr 0.0004; last losses total 0.667, lm 0.333" in card
    assert "- stage2: 5 steps of batch 16 in 5 min, lr 0.0004, LoRA" in card
    assert "box_l1" not in card   # zero losses (units absent from the last batch) are left out
    assert "| rec | acc@0.5 | 0.900 | >= 0.85 | met |" in card
    assert "| depth | absrel | 0.200 | <= 0.15 | **short** |" in card
    assert "| res | ciou | not evaluated |" in card
    assert "| depth | valid TRP (50 answers) | 0.950 | >= 0.99 | **short** |" in card
    assert "42 min" in card and "`tools/train_nano.sh`" in card
    out = tmp_path / "card.md"
    assert main(["--run", str(tmp_path), "--out", str(out), "--command", "c", "--wall-min", "1",
                 "--data", "d"]) == 0
    assert out.read_text().startswith("# REF-VLM nano")


def test_targets_cover_the_issue_and_empty_stage_is_a_clear_error(tmp_path):
    assert {(t.task, t.metric) for t in NANO_TARGETS} == {
        ("rec", "acc@0.5"), ("res", "ciou"), ("keypoint", "pck@0.1"), ("depth", "absrel")}
    assert len(metrics_table({})) == 2 + len(NANO_TARGETS)
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "metrics.jsonl").write_text("")
    with pytest.raises(InputError, match="no logged step"):
        render_card(tmp_path, "c", 1, "d")


def test_wall_seconds_adds_the_segments_of_a_resumed_run():
    from refvlm_training.evaluation.model_card import wall_seconds

    steps = [{"seconds": 10.0}, {"seconds": 20.0}, {"seconds": 5.0}, {"seconds": 15.0}]  # resumed after 20 s
    assert wall_seconds(steps) == 35.0
    assert wall_seconds([{"seconds": 3.0}]) == 3.0


def test_card_reports_rec_per_kind_and_the_stage_gates(tmp_path):
    _write_stage(tmp_path, "stage2", 2, 2)
    metrics = {"acc@0.5": 0.8, "miou": 0.6, "valid_trp": 1.0, "acc@0.5/attribute": 0.96, "count/attribute": 50,
               "acc@0.5/relation": 0.6, "count/relation": 30}
    EvalReport("rec", metrics, 80, 1.0).write_json(tmp_path / "eval-rec.json")
    towers = {"pathways": {"color": {"test": 0.97}, "shape": {"test": 0.91, "test_held_out": 0.85},
                           "material": {"test": 0.8}, "size": {"test": 0.93}}}
    (tmp_path / "probe-towers.json").write_text(json.dumps(towers))
    (tmp_path / "probe-refs.json").write_text(json.dumps({"normalised": {"mean_pairwise_cosine": 0.01}}))
    (tmp_path / "probe-choice.json").write_text(json.dumps({"covered": 0.9, "chosen_hit": 0.5}))
    card = render_card(tmp_path, "c", 1, "d")
    assert "| choice | covered | 0.900 | >= 0.85 | met |" in card
    assert "| choice | chosen_hit | 0.500 | >= 0.85 | **short** |" in card
    assert "| rec, attribute (50) | acc@0.5 | 0.960 | >= 0.95 | met |" in card
    assert "| rec, relation (30) | acc@0.5 | 0.600 |  |  |" in card
    assert "| towers | pathways / shape / test_held_out | 0.850 | >= 0.9 | **short** |" in card
    assert "| towers | pathways / color / test | 0.970 | >= 0.95 | met |" in card
    assert "| refs | normalised / mean_pairwise_cosine | 0.010 | <= 0.5 | met |" in card
