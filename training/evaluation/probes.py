"""Probes that measure each stage of a model before the next one is trained on it.

A run that ends at chance says nothing about which part failed. These probes do, in
minutes, on outputs computed once:

- ``tower_probes``: per-object linear probes of the frozen towers. Each visible object of
  SimWorld scenes is described by its pyramid features inside its true box (the box mean,
  and a 3 x 3 ROI grid), and a linear classifier fit on train-split objects reads its
  colour, shape, material and size on objects of new train scenes, of test scenes, and of
  the test objects whose colour x shape pair never occurs in training (held-out pairs).
  A readout that leans on colour to guess shape scores high on seen pairs and low on
  held-out ones: this is where that shows.
- ``ref_spread``: how different the <REF> states of different questions are, raw and after
  the decoders' input normalisation (mean pairwise cosine; share of variance between
  phrases). Nearly identical states give every decoder query the same start.

- ``choice_probe``: an objects decoder's single-target answers split into targets that no
  proposal covers (the towers' object maps) and wrong choices among covering proposals.

Each writes a plain dict (JSON) for the model card; ``refvlm probe`` runs them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F

ATTRIBUTES = ("color", "shape", "material", "size")


# ---- per-object features of the towers ----------------------------------------------

@dataclass
class ObjectSet:
    """Visible objects of some scenes: features and labels, one row an object."""

    mean: torch.Tensor        # [N, sum C] box means of the pyramid levels (object maps left out)
    grid: torch.Tensor        # [N, 9 * sum C] 3 x 3 ROI grids of the same channels
    form: torch.Tensor        # [N, 9 * sum C_form] ROI grids of the ConvNeXt's channels alone
    colour: torch.Tensor      # [N, 9 * sum C_colour] ROI grids of the colour pathway's (empty without one)
    labels: torch.Tensor      # [N, 4] long: colour, shape, material, size
    held_out: torch.Tensor    # [N] bool: a rigid object of a held-out colour x shape pair
    person: torch.Tensor      # [N] bool


@torch.no_grad()
def object_features(encoder, split: str, scenes: Iterable[int], width: int = 256, height: int = 192,
                    seed: int = 0, min_pixels: int = 25, batch: int = 8, progress: bool = False) -> ObjectSet:
    """Render ``scenes`` of ``split`` and describe each object with at least ``min_pixels``
    visible pixels by its features inside its true box (model frame)."""
    from refvlm_core.roi import roi_grid, roi_mean
    from refvlm_simworld import SimWorld, SimWorldConfig
    from refvlm_simworld.splits import HELD_OUT_COLOR_SHAPE
    from refvlm_training.engine.stage0 import IGNORE, dense_targets

    world = SimWorld(SimWorldConfig(seed=seed, width=width, height=height), split)
    encoder = encoder.eval()
    size = encoder.cfg.image_size
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in ("mean", "grid", "form", "colour", "labels",
                                                                   "held_out", "person")}
    layout = encoder.layout
    indices = list(scenes)
    chunks = [indices[i:i + batch] for i in range(0, len(indices), batch)]
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc=f"tower features ({split})", unit="batch")
    for chunk in chunks:
        rendered = [world.scene(i) for i in chunk]
        targets = [dense_targets(scene, size) for scene in rendered]
        form, colour, _ = layout.split(encoder(torch.stack([t.image for t in targets])).pyramid)
        pyramid = [torch.cat([f, c], dim=1) for f, c in zip(form, colour)] if colour else form
        boxes = torch.stack([t.boxes for t in targets])                      # [B, K, 4]
        labels = torch.stack([t.labels for t in targets])                    # [B, K, 4]
        pixels = [_visible_pixels(scene, t) for scene, t in zip(rendered, targets)]
        keep = (labels[..., 0] != IGNORE) & (torch.stack(pixels) >= min_pixels)
        parts["mean"].append(roi_mean(pyramid, boxes)[keep])
        parts["grid"].append(roi_grid(pyramid, boxes)[keep])
        parts["form"].append(roi_grid(form, boxes)[keep])
        parts["colour"].append(roi_grid(colour, boxes)[keep] if colour else torch.zeros(int(keep.sum()), 0))
        parts["labels"].append(labels[keep])
        pairs = [[_pair(scene, k) for k in range(boxes.shape[1])] for scene in rendered]
        parts["held_out"].append(torch.tensor([[p in HELD_OUT_COLOR_SHAPE for p in row] for row in pairs])[keep])
        parts["person"].append(torch.tensor([[p[1] == "person" for p in row] for row in pairs])[keep])
    return ObjectSet(**{k: torch.cat(v) for k, v in parts.items()})


def _visible_pixels(scene, targets) -> torch.Tensor:
    """[K] visible pixels of each row of ``targets.boxes`` (rows in instance order, as stage 0)."""
    from refvlm_training.engine.stage0 import MAX_OBJECTS

    counts = scene.pixel_counts()
    rows = sorted(scene.boxes)[:MAX_OBJECTS]
    out = torch.zeros(MAX_OBJECTS, dtype=torch.long)
    out[:len(rows)] = torch.tensor([int(counts[i]) for i in rows], dtype=torch.long)
    return out


def _pair(scene, row: int) -> tuple[str, str]:
    from refvlm_training.engine.stage0 import MAX_OBJECTS

    rows = sorted(scene.boxes)[:MAX_OBJECTS]
    if row >= len(rows):
        return ("", "")
    obj = next(o for o in scene.objects if o.instance_id == rows[row])
    return (obj.color, obj.category)


# ---- linear probes --------------------------------------------------------------------

def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300,
                     weight_decay: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    """A multinomial logistic regression on standardised features (full-batch L-BFGS).
    Returns the standardisation (mean, std) and the fitted layer."""
    torch.manual_seed(0)
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    layer = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(z), y) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return mean, std, layer


@torch.no_grad()
def probe_accuracy(probe, x: torch.Tensor, y: torch.Tensor) -> float | None:
    if len(y) == 0:
        return None
    mean, std, layer = probe
    return round(float((layer((x - mean) / std).argmax(-1) == y).float().mean()), 4)


def tower_probes(encoder, train_scenes: int = 300, new_train_scenes: int = 100, test_scenes: int = 100,
                 width: int = 256, height: int = 192, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Per-object linear probes (see the module doc): per feature kind and attribute, accuracy
    on the train objects it was fit on, on new train-split scenes, on the test split, and
    (shape, colour) on test objects of held-out and of seen pairs. Kinds: ``mean`` (box mean of
    the pyramid), ``grid`` (3 x 3 ROI grid) and, for towers with a colour pathway,
    ``pathways`` (colour read from the colour pathway's grid, the rest from the ConvNeXt's)."""
    from refvlm_simworld.splits import COLOR_NAMES
    from refvlm_simworld.world import CATEGORIES, MATERIALS, SIZES

    classes = dict(zip(ATTRIBUTES, (len(COLOR_NAMES), len(CATEGORIES), len(MATERIALS), len(SIZES))))
    sets = {
        "train": object_features(encoder, "train", range(train_scenes), width, height, seed, progress=progress),
        "new_train": object_features(encoder, "train", range(train_scenes, train_scenes + new_train_scenes),
                                     width, height, seed, progress=progress),
        "test": object_features(encoder, "test", range(test_scenes), width, height, seed, progress=progress),
    }
    report: dict[str, Any] = {"objects": {name: int(len(s.labels)) for name, s in sets.items()},
                              "test_held_out_objects": int(sets["test"].held_out.sum())}
    kinds = {"mean": dict.fromkeys(ATTRIBUTES, "mean"), "grid": dict.fromkeys(ATTRIBUTES, "grid")}
    if sets["train"].colour.shape[1]:
        kinds["pathways"] = {**dict.fromkeys(ATTRIBUTES, "form"), "color": "colour"}
    for kind, features in kinds.items():
        rows = {}
        for column, name in enumerate(ATTRIBUTES):
            field, train = features[name], sets["train"]
            probe = fit_linear_probe(getattr(train, field), train.labels[:, column], classes[name])
            row = {split: probe_accuracy(probe, getattr(s, field), s.labels[:, column]) for split, s in sets.items()}
            if name in ("shape", "color"):
                test, rigid = sets["test"], ~sets["test"].person
                row["test_held_out"] = probe_accuracy(probe, getattr(test, field)[test.held_out],
                                                      test.labels[test.held_out, column])
                seen = rigid & ~test.held_out
                row["test_seen_pairs"] = probe_accuracy(probe, getattr(test, field)[seen], test.labels[seen, column])
            rows[name] = row
        report[kind] = rows
    return report


# ---- <REF> states ---------------------------------------------------------------------

def mean_pairwise_cosine(states: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of different rows of states [N, D]."""
    n = states.shape[0]
    if n < 2:
        return float("nan")
    unit = F.normalize(states.float(), dim=-1)
    sims = unit @ unit.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def between_group_share(states: torch.Tensor, groups: list[str]) -> float:
    """Share of the states' total variance that lies between groups (e.g. phrases)."""
    x = states.float()
    total = (x - x.mean(0)).pow(2).sum()
    if float(total) == 0:
        return 0.0
    between = x.new_zeros(())
    for group in set(groups):
        rows = x[[i for i, g in enumerate(groups) if g == group]]
        between = between + len(rows) * (rows.mean(0) - x.mean(0)).pow(2).sum()
    return float(between / total)


@torch.no_grad()
def teacher_forced_batches(model, items: list, batch: int, progress: bool, desc: str):
    """Per chunk of ``batch`` samples: (the samples, their collated batch, ImageFeatures, the
    teacher-forced <REF> states of each sample [n_b, D]); the model in eval mode, no autograd
    graph (a caller keeping the states of many batches would otherwise keep the LLM's)."""
    model = model.eval()
    processor = model.processor
    chunks = [items[i:i + batch] for i in range(0, len(items), batch)]
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc=desc, unit="batch")
    for chunk in chunks:
        collated = processor.collate([processor.encode_sample(s) for s in chunk])
        features = model.encode_images(collated["images"])
        hidden = model.llm_hidden_states(collated, features)
        yield chunk, collated, features, model.teacher_forced_refs(collated, hidden)


@torch.no_grad()
def ref_states(model, samples: Iterable, batch: int = 8, progress: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Teacher-forced <REF> states of ``samples`` [N, D] and the phrase of each."""
    items = [s for s in samples if any(t.targets for t in s.turns)]
    states, phrases = [], []
    for chunk, _, _, refs in teacher_forced_batches(model, items, batch, progress, "<REF> states"):
        for sample, sample_refs in zip(chunk, refs):
            names = [t.phrase for turn in sample.turns for t in turn.targets for _ in range(t.count)]
            states.append(sample_refs)
            phrases.extend(names[:len(sample_refs)] + ["?"] * (len(sample_refs) - len(names)))
    return torch.cat(states), phrases


def ref_spread(model, samples: Iterable, unit: str = "box", fit_samples: Iterable | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Spread of the <REF> states of ``samples``: raw, and after ``unit``'s decoder input
    normalisation; with ``fit_samples``, also standardised by those samples' statistics
    (what ``ref_norm: standard`` would give this model's states)."""
    states, phrases = ref_states(model, samples, progress=progress)

    def spread(x: torch.Tensor) -> dict[str, float]:
        return {"mean_pairwise_cosine": round(mean_pairwise_cosine(x), 4),
                "between_phrase_share": round(between_group_share(x, phrases), 4)}

    report = {"refs": int(states.shape[0]), "phrases": len(set(phrases)),
              "raw": {**spread(states), "norm": round(float(states.norm(dim=-1).mean()), 2)},
              "normalised": spread(decoder_input(model.decoders[unit], states)),
              "ref_norm": getattr(model.decoders[unit], "ref_norm", "layer")}
    if fit_samples is not None:
        from refvlm_core.decoders.layers import RefStandardizer

        fit, _ = ref_states(model, fit_samples, progress=progress)
        standardizer = RefStandardizer(states.shape[1])
        standardizer.update(fit.float())                 # the first update takes the statistics exactly
        report["standardised"] = {**spread(standardizer.eval()(states[None], torch.ones(1, len(states),
                                                                                         dtype=torch.bool))[0]),
                                  "fit_refs": int(fit.shape[0])}
    return report


@torch.no_grad()
def decoder_input(decoder, states: torch.Tensor) -> torch.Tensor:
    """states [N, D] as the decoder's trunk normalises them before its first layer."""
    norm = decoder.trunk.queries.norm
    was = norm.training
    norm.eval()
    try:
        if isinstance(norm, torch.nn.LayerNorm):
            return norm(states)
        return norm(states[None], torch.ones(1, states.shape[0], dtype=torch.bool))[0]
    finally:
        norm.train(was)


# ---- an object decoder's choice: finding vs choosing ---------------------------------

@torch.no_grad()
def choice_probe(model, samples: Iterable, unit: str = "box", batch: int = 8, progress: bool = False,
                 min_iou: float = 0.5) -> dict[str, Any]:
    """Where an ``objects`` decoder's single-target answers fail: no proposal covers the
    target (the towers' object maps), or a covering proposal exists and the <REF> query
    chooses another (the states or the chooser). On teacher-forced <REF> states, per target:
    ``covered`` (some proposal has IoU >= ``min_iou``: the ceiling of a perfect choice),
    ``chosen_hit`` (the chosen proposal has it: acc@0.5 before the box refinement),
    ``best_chosen`` (the choice is the best-covering proposal, what the choice loss trains)
    and ``best_rank`` (that proposal's rank among the choice's logits, 0 = chosen); overall
    and per kind of phrase (attribute, relation, superlative)."""
    from refvlm_core.geometry import box_iou, cxcywh_to_xyxy
    from refvlm_simworld.language import expression_kind

    decoder_kind = model.config.decoders.get(unit, {}).get("kind", "default")
    if decoder_kind != "objects":
        raise ValueError(f"the {unit} decoder is of kind {decoder_kind!r}: the choice probe needs kind 'objects'")
    decoder = model.decoders[unit]

    def targets(sample) -> list:
        return [t for turn in sample.turns for t in turn.targets]

    items = [s for s in samples if len(targets(s)) == 1 and targets(s)[0].count == 1]
    rows = []
    for chunk, collated, features, refs in teacher_forced_batches(model, items, batch, progress, "choices"):
        for b, sample in enumerate(chunk):
            target = collated["targets"][unit][b]
            if target.value is None or target.count != 1:
                continue
            chosen = decoder.trunk(refs[b][None, :1], torch.ones(1, 1, dtype=torch.bool),
                                   [level[b:b + 1] for level in features.pyramid])
            iou = box_iou(cxcywh_to_xyxy(target.value.float()), chosen["proposals"][0])[0]     # [K]
            logits = chosen["selection_logits"][0, 0]                                          # [K]
            best = int(iou.argmax())
            rows.append({"kind": expression_kind(targets(sample)[0].phrase), "covered": float(iou.max() >= min_iou),
                         "chosen_hit": float(iou[int(logits.argmax())] >= min_iou),
                         "best_chosen": float(int(logits.argmax()) == best),
                         "best_rank": float((logits > logits[best]).sum())})

    def summary(subset: list[dict]) -> dict[str, float]:
        return {"count": len(subset), **{key: round(sum(r[key] for r in subset) / max(len(subset), 1), 4)
                                         for key in ("covered", "chosen_hit", "best_chosen", "best_rank")}}

    kinds = sorted({r["kind"] for r in rows})
    return {"unit": unit, "min_iou": min_iou, "proposals": decoder.trunk.num_objects, **summary(rows),
            "per_kind": {kind: summary([r for r in rows if r["kind"] == kind]) for kind in kinds}}
