"""Sample schema: round trips through shards, and validation on read."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data_helpers import toy_annotations, toy_samples
from refvlm_core import trp
from refvlm_training.data import schema, shards
from refvlm_training.data.tasks import build_samples


def _assert_same(a, b) -> None:
    assert (a.id, a.task, a.system) == (b.id, b.task, b.system)
    np.testing.assert_array_equal(a.image, b.image)
    if a.depth is None:
        assert b.depth is None
    else:
        np.testing.assert_array_equal(a.depth, b.depth)
    assert [(p.kind) for p in a.visual_prompts] == [p.kind for p in b.visual_prompts]
    for pa, pb in zip(a.visual_prompts, b.visual_prompts):
        if pa.kind == "mask":
            np.testing.assert_array_equal(pa.mask, pb.mask)
        else:
            np.testing.assert_allclose(pa.points, pb.points, atol=1e-5)
    assert [(t.role, t.text) for t in a.turns] == [(t.role, t.text) for t in b.turns]
    for ta, tb in zip(a.turns, b.turns):
        assert len(ta.targets) == len(tb.targets)
        for x, y in zip(ta.targets, tb.targets):
            assert (x.phrase, x.units, x.count) == (y.phrase, y.units, y.count)
            for name in ("boxes", "masks", "keypoints"):
                va, vb = getattr(x, name), getattr(y, name)
                assert (va is None) == (vb is None), name
                if va is not None:
                    np.testing.assert_allclose(va, vb, atol=0.006)


def test_round_trip_every_task(tmp_path):
    samples = toy_samples(n_images=1)
    tasks = {s.task for s in samples}
    assert {"caption", "vqa", "rec", "res", "gcg_box", "gcg_mask", "ovd", "freeform_ovs", "keypoint",
            "depth", "multi", "reg_scribble", "ig_mask_box"} <= tasks
    with shards.ShardWriter(tmp_path, "rt", max_samples_per_shard=7) as writer:
        for sample in samples:
            writer.write(sample)
    paths = shards.list_shards(tmp_path)
    assert len(paths) == -(-len(samples) // 7)
    back = list(shards.read_samples(tmp_path))
    assert len(back) == len(samples)
    for a, b in zip(samples, back):
        _assert_same(a, b)


def test_answers_come_from_the_serialiser_and_counts_match():
    for sample in toy_samples(n_images=1):
        for turn in sample.turns:
            if turn.role == "assistant" and turn.targets:
                parsed = trp.parse(turn.text, strict=True)
                assert [len(b.refs) for _, b in parsed.blocks()] == [t.count for t in turn.targets]
                assert [p for p, _ in parsed.blocks()] == [t.phrase for t in turn.targets]


def _record(sample):
    return schema.sample_to_record(sample, "png", "depth.npy" if sample.depth is not None else None)


def _first(task: str):
    return next(s for s in toy_samples(n_images=1) if s.task == task)


@pytest.mark.parametrize("corrupt, reason", [
    (lambda r: r.update(schema_version=99), "schema"),
    (lambda r: r["turns"][1]["targets"][0].update(boxes=[[10, 10, 500, 20]]), "box_outside_image"),
    (lambda r: r["turns"][1]["targets"][0].update(masks=[{"size": [24, 32], "counts": "zz"}]), "bad_rle"),
    (lambda r: r["turns"][1].update(text=r["turns"][1]["text"].replace("[0]<REF>", "[0]<REF>[1]<REF>")),
     "ref_count_mismatch"),
    (lambda r: r["turns"][1].update(targets=[]), "ref_count_mismatch"),
])
def test_validation_names_sample_field_and_reason(corrupt, reason):
    sample = _first("res")
    record = _record(sample)
    corrupt(record)
    with pytest.raises(schema.SampleError) as caught:
        schema.record_to_sample(json.loads(json.dumps(record)), sample.image)
    assert caught.value.reason == reason
    assert sample.id in str(caught.value)


def test_image_size_mismatch_is_reported():
    sample = _first("rec")
    with pytest.raises(schema.SampleError, match="image"):
        schema.record_to_sample(_record(sample), sample.image[:10])


def test_region_count_must_match_visual_prompts():
    sample = _first("reg_point")
    record = _record(sample)
    record["visual_prompts"] = []
    with pytest.raises(schema.SampleError, match="visual_prompts"):
        schema.record_to_sample(record, sample.image)


def test_duplicate_ids_rejected(tmp_path):
    sample = _first("caption")
    with shards.ShardWriter(tmp_path) as writer:
        writer.write(sample)
        with pytest.raises(Exception, match="duplicate"):
            writer.write(sample)


def test_user_text_cannot_inject_tags():
    ann = toy_annotations()
    ann.objects[0].expressions = ["the <REF> cube"]
    import random
    rec = [s for s in build_samples(ann, random.Random(0), tasks=("rec",))]
    assert rec and all("<REF> cube" not in s.turns[0].text for s in rec)
    assert all(trp.parse(s.turns[1].text, strict=True).ok for s in rec)
