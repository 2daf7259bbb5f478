"""Loader: deterministic shuffling, exact resume, disjoint complete rank/worker split,
corrupt samples skipped and counted."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from data_helpers import toy_samples
from refvlm_core.errors import InputError
from refvlm_training.data import schema, shards
from refvlm_training.data.loader import VTInstructDataset, collate_samples


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader")
    with shards.ShardWriter(out, "toy", max_samples_per_shard=10) as writer:
        for sample in toy_samples(n_images=1):
            writer.write(sample)
    return out


def _ids(dataset) -> list[str]:
    return [s.id for s in dataset]


def test_shuffle_is_deterministic_per_seed_and_epoch(shard_dir):
    first, again, other_seed = (VTInstructDataset(shard_dir, seed=s) for s in (1, 1, 2))
    order = _ids(first)
    assert order == _ids(again)
    assert sorted(order) == sorted(_ids(VTInstructDataset(shard_dir, shuffle=False)))
    assert order != _ids(other_seed)
    again.set_epoch(1)
    assert _ids(again) != order and sorted(_ids_epoch(shard_dir, 1)) == sorted(order)


def _ids_epoch(shard_dir, epoch):
    dataset = VTInstructDataset(shard_dir, seed=1)
    dataset.set_epoch(epoch)
    return _ids(dataset)


def test_resume_gives_exactly_the_same_next_samples(shard_dir):
    full = _ids(VTInstructDataset(shard_dir, seed=3))
    dataset = VTInstructDataset(shard_dir, seed=3)
    stream = iter(dataset)
    head = [next(stream).id for _ in range(7)]
    state = dataset.state_dict()
    assert state["position"] == 7
    resumed = VTInstructDataset(shard_dir, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert head + _ids(resumed) == full
    with pytest.raises(InputError, match="seed"):
        VTInstructDataset(shard_dir, seed=4).load_state_dict(state)


def test_ranks_are_disjoint_and_complete(shard_dir):
    everything = _ids(VTInstructDataset(shard_dir, seed=5))
    parts = [_ids(VTInstructDataset(shard_dir, seed=5, rank=r, world_size=3)) for r in range(3)]
    assert sum(len(p) for p in parts) == len(everything)
    assert sorted(sum(parts, [])) == sorted(everything)


def test_workers_keep_the_stream_order_and_resume(shard_dir):
    in_process = _ids(VTInstructDataset(shard_dir, seed=6))
    dataset = VTInstructDataset(shard_dir, seed=6)
    batches = dataset.batches(batch_size=4, num_workers=2)
    first = [s.id for s in next(batches)] + [s.id for s in next(batches)]
    state = dataset.state_dict()
    batches.close()
    assert first == in_process[:8] and state["position"] == 8
    resumed = VTInstructDataset(shard_dir, seed=6)
    resumed.load_state_dict(state)
    rest = [s.id for batch in resumed.batches(batch_size=5, num_workers=2) for s in batch]
    assert first + rest == in_process


def _rewrite_member(shard, key_suffix_to_bytes: dict[str, bytes]) -> None:
    """Replace members of an existing shard in place (to craft corrupt samples)."""
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            data = key_suffix_to_bytes.get(info.name, data)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    samples = toy_samples(n_images=1)
    by_task = {s.task: s for s in samples}
    chosen = [by_task[t] for t in ("caption", "rec", "res", "ovd", "depth")]
    with shards.ShardWriter(tmp_path, "bad") as writer:
        keys = [writer.write(s) for s in chosen]
    shard = shards.list_shards(tmp_path)[0]
    records = {k: schema.sample_to_record(s, "png", "depth.npy" if s.depth is not None else None)
               for k, s in zip(keys, chosen)}
    records[keys[2]]["turns"][1]["targets"][0]["masks"][0]["counts"] = "!!bad"
    records[keys[3]]["turns"][1]["targets"][0]["boxes"][0] = [0, 0, 9999, 10]
    records[keys[4]]["turns"][1]["text"] += " <Phrase>extra</Phrase> (<Unit>box</Unit>[0]<REF>)"
    _rewrite_member(shard, {
        f"{keys[1]}.png": b"not an image",
        **{f"{k}.json": schema.record_to_json(records[k]) for k in keys[2:]},
    })
    dataset = VTInstructDataset(tmp_path, seed=0)
    with caplog.at_level("WARNING"):
        good = _ids(dataset)
    assert good == [chosen[0].id]
    assert dataset.skipped == {"unreadable_image": 1, "bad_rle": 1, "box_outside_image": 1,
                               "ref_count_mismatch": 1}
    assert all(s.id in caplog.text for s in chosen[1:])
    assert dataset.state_dict()["position"] == 5


def test_collate_keeps_variable_targets():
    samples = [s for s in toy_samples(n_images=1) if s.task in ("ovd", "rec")]
    batch = collate_samples(samples + [None])
    assert batch == samples
    assert sorted({t.count for s in batch for t in s.turns[1].targets}) == [1, 2]


def test_max_samples_keeps_the_first_samples_in_shard_order(shard_dir):
    everything = _ids(VTInstructDataset(shard_dir, shuffle=False))
    first = VTInstructDataset(shard_dir, seed=1, max_samples=3)
    assert len(first) == 3 and sorted(_ids(first)) == sorted(everything[:3])
