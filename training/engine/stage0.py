"""Stage 0: vision pretraining of the towers on SimWorld's exact dense ground truth.

The paper starts from CLIP towers; none can be installed here, so the towers learn
what the decoders need from what the simulator knows exactly, per pixel: each object's
colour, shape (category), material and size, an object-centre heatmap and metric depth.
Separate colour and shape heads make both linearly readable from the features, which is
what referring to a held-out colour x shape pair needs (compositional features).

Heads: an FPN over the pyramid for every per-pixel target, a linear head on the ViT
tokens for colour and shape (the tokens the LLM sees), and linear heads on each object's
ROI grid (``refvlm_core.roi``) for its colour, shape, material and size, so that an
object's attributes are linearly readable from its features, which is what a decoder that
chooses among objects reads. When the towers have a colour pathway
(``vision.colour_channels``), colour is learnt from its channels alone and every other
target from the ConvNeXt's alone, so no head can read shape through colour. Scenes are rendered on the fly
from the train split (scene ``k`` of the step's permutation), so a resumed run sees the
same scenes in the same order. Output: ``OUT/model/{vit,convnext}.safetensors`` (set
``vision.vit_weights`` / ``vision.convnext_weights`` of stage 1 to them) and the heads.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refvlm_core.errors import ConfigError
from refvlm_core.targets import DENSE_STRIDE  # dense targets at S/4, as the decoders' (mask, depth)

log = logging.getLogger(__name__)
IGNORE = -1


# ---- targets ------------------------------------------------------------------------

@dataclass
class DenseTargets:
    """One scene's per-pixel ground truth at S/4 in the model frame (letterboxed)."""

    image: Tensor      # [3, S, S] float in [0, 1]
    objects: Tensor    # [R, R] float: 1 on object pixels, 0 on background
    color: Tensor      # [R, R] long: colour index, IGNORE on background
    shape: Tensor      # [R, R] long: category index, IGNORE on background
    material: Tensor   # [R, R] long: material index, IGNORE on background
    size: Tensor       # [R, R] long: size index, IGNORE on background
    centre: Tensor     # [R, R] float in [0, 1]: Gaussian bumps at the objects' box centres
    edges: Tensor      # [4, R, R] log distances (fractions of the frame) to the own box's left, top, right,
                       # bottom edges on object pixels, NaN on background
    depth: Tensor      # [R, R] float metres, NaN where unknown (sky, padding)
    boxes: Tensor      # [K, 4] visible objects' xyxy in [0, 1] of the model frame, zeros past the last
    labels: Tensor     # [K, 4] long: colour, shape, material, size of each box, IGNORE past the last


ATTRIBUTES = ("color", "shape", "material", "size")  # the columns of DenseTargets.labels
MAX_OBJECTS = 12                                     # SimWorld's bound on objects per scene


def _letterbox_sample(values: np.ndarray, letterbox, out: int, fill) -> np.ndarray:
    """Nearest sample of an [H, W] map at the centres of an out x out model-frame grid."""
    step = letterbox.side / out
    coords = (np.arange(out) + 0.5) * step
    xs, ys = np.floor(coords - letterbox.left).astype(int), np.floor(coords - letterbox.top).astype(int)
    inside = (ys[:, None] >= 0) & (ys[:, None] < letterbox.height) & (xs[None] >= 0) & (xs[None] < letterbox.width)
    picked = values[ys.clip(0, letterbox.height - 1)][:, xs.clip(0, letterbox.width - 1)]
    return np.where(inside, picked, fill)


def dense_targets(scene, image_size: int) -> DenseTargets:
    """A rendered SimWorld scene -> its DenseTargets for a model frame of ``image_size``."""
    from refvlm_core.geometry import CLIP_MEAN_RGB, Letterbox
    from refvlm_simworld.splits import COLOR_NAMES
    from refvlm_simworld.world import CATEGORIES, MATERIALS, SIZES

    height, width = scene.rgb.shape[:2]
    letterbox = Letterbox.fit(height, width, image_size)
    out = image_size // DENSE_STRIDE
    ids = _letterbox_sample(scene.instance_ids, letterbox, out, 0)
    count = len(scene.objects) + 1
    tables = {name: np.full(count, IGNORE, np.int64) for name in ATTRIBUTES}
    for obj in scene.objects:
        tables["color"][obj.instance_id] = COLOR_NAMES.index(obj.color)
        tables["shape"][obj.instance_id] = CATEGORIES.index(obj.category)
        tables["material"][obj.instance_id] = MATERIALS.index(obj.material)
        tables["size"][obj.instance_id] = SIZES.index(obj.size)
    depth = np.where(np.isfinite(scene.depth), scene.depth, np.nan).astype(np.float32)
    framed = letterbox.image_to_model(scene.rgb, CLIP_MEAN_RGB)
    return DenseTargets(
        image=torch.from_numpy(framed).permute(2, 0, 1).float() / 255.0,
        objects=torch.from_numpy((ids > 0).astype(np.float32)),
        **{name: torch.from_numpy(table[ids]) for name, table in tables.items()},
        centre=torch.from_numpy(_centre_heatmap(scene.boxes, letterbox, out)),
        edges=torch.from_numpy(_edge_distances(ids, scene.boxes, letterbox, out)),
        depth=torch.from_numpy(_letterbox_sample(depth, letterbox, out, np.nan).astype(np.float32)),
        **_object_table(scene.boxes, tables, letterbox),
    )


def _object_table(boxes: dict[int, np.ndarray], tables: dict[str, np.ndarray], letterbox) -> dict[str, Tensor]:
    """Visible objects' boxes (model frame, normalised) and attribute labels, padded to MAX_OBJECTS."""
    out_boxes = np.zeros((MAX_OBJECTS, 4), np.float32)
    labels = np.full((MAX_OBJECTS, len(ATTRIBUTES)), IGNORE, np.int64)
    for row, (instance, xyxy) in enumerate(sorted(boxes.items())[:MAX_OBJECTS]):
        out_boxes[row] = letterbox.boxes_to_model(xyxy[None])[0] / letterbox.size
        labels[row] = [tables[name][instance] for name in ATTRIBUTES]
    return {"boxes": torch.from_numpy(out_boxes), "labels": torch.from_numpy(labels)}


def _edge_distances(ids: np.ndarray, boxes: dict[int, np.ndarray], letterbox, out: int) -> np.ndarray:
    """[4, out, out] log of each object pixel's distance to its box's edges (fractions of the
    frame, at least half a cell), NaN on background."""
    edges = np.full((4, out, out), np.nan, np.float32)
    centres = (np.arange(out) + 0.5) / out
    for instance, xyxy in boxes.items():
        rows, cols = np.nonzero(ids == instance)
        if len(rows) == 0:
            continue
        x0, y0, x1, y1 = letterbox.boxes_to_model(xyxy[None])[0] / letterbox.size
        x, y = centres[cols], centres[rows]
        distances = np.stack([x - x0, y - y0, x1 - x, y1 - y])
        edges[:, rows, cols] = np.log(np.maximum(distances, 0.5 / out))
    return edges


def _centre_heatmap(boxes: dict[int, np.ndarray], letterbox, out: int) -> np.ndarray:
    """Max over objects of a Gaussian at each box centre, sigma a sixth of the box size."""
    heat = np.zeros((out, out), np.float32)
    grid = np.arange(out) + 0.5
    for xyxy in boxes.values():
        x0, y0, x1, y1 = letterbox.boxes_to_model(xyxy[None])[0] / DENSE_STRIDE
        sx, sy = max((x1 - x0) / 6, 0.5), max((y1 - y0) / 6, 0.5)
        bump = np.exp(-((grid[None] - (x0 + x1) / 2) ** 2) / (2 * sx ** 2)
                      - ((grid[:, None] - (y0 + y1) / 2) ** 2) / (2 * sy ** 2))
        heat = np.maximum(heat, bump.astype(np.float32))
    return heat


class SceneTargets(torch.utils.data.Dataset):
    """Train-split SimWorld scenes rendered on demand, as DenseTargets."""

    def __init__(self, scenes: int, width: int, height: int, image_size: int, seed: int = 0) -> None:
        from refvlm_simworld import SimWorld, SimWorldConfig

        self.world = SimWorld(SimWorldConfig(seed=seed, width=width, height=height), "train")
        self.scenes, self.image_size = scenes, image_size

    def __len__(self) -> int:
        return self.scenes

    def __getitem__(self, index: int) -> DenseTargets:
        return dense_targets(self.world.scene(index), self.image_size)


def collate_targets(items: list[DenseTargets]) -> DenseTargets:
    return DenseTargets(**{name: torch.stack([getattr(t, name) for t in items])
                           for name in DenseTargets.__dataclass_fields__})


# ---- heads and losses ---------------------------------------------------------------

def head_sizes() -> dict[str, int]:
    """Output channels per dense target. Attribute classes are learnt on object pixels only
    (background would swamp them: ~90% of pixels); ``objects`` separates the two."""
    from refvlm_simworld.splits import COLOR_NAMES
    from refvlm_simworld.world import CATEGORIES, MATERIALS, SIZES

    return {"objects": 1, "color": len(COLOR_NAMES), "shape": len(CATEGORIES), "material": len(MATERIALS),
            "size": len(SIZES), "centre": 1, "depth": 1}


class DenseHeads(nn.Module):
    """Per-pixel heads on an FPN of the pyramid, colour + shape heads on the ViT tokens, and
    attribute heads on each object's ROI grid.

    ``layout`` (the encoder's PyramidLayout) says which channels are which. With a colour
    pathway the colour heads read its channels alone and the other heads the ConvNeXt's.
    With object maps in the towers, the centre heatmap is theirs (no centre head here).
    """

    def __init__(self, layout, vit_width: int, hidden_dim: int = 64, roi_grid_size: int = 3) -> None:
        super().__init__()
        from refvlm_core.decoders.layers import PixelDecoder
        from refvlm_core.roi import roi_channels

        self.layout, self.roi_grid_size = layout, roi_grid_size
        self.sizes = head_sizes()
        skip = {"color"} if layout.colour else set()
        skip |= {"centre"} if layout.maps else set()
        self.pixel_sizes = {k: v for k, v in self.sizes.items() if k not in skip}
        self.pixel_decoder = PixelDecoder(list(layout.form), hidden_dim, hidden_dim)
        self.pixel_head = nn.Conv2d(hidden_dim, sum(self.pixel_sizes.values()), 1)
        self.colour_pixel_head = nn.Conv2d(layout.colour, self.sizes["color"], 1) if layout.colour else None
        self.token_sizes = {k: self.sizes[k] for k in ("color", "shape")}
        self.token_head = nn.Sequential(nn.LayerNorm(vit_width), nn.Linear(vit_width, sum(self.token_sizes.values())))
        form_roi = roi_channels(layout.form, roi_grid_size)
        colour_roi = roi_channels([layout.colour] * len(layout.form), roi_grid_size) if layout.colour else form_roi
        self.object_heads = nn.ModuleDict({name: nn.Linear(colour_roi if name == "color" else form_roi,
                                                           self.sizes[name]) for name in ATTRIBUTES})

    def forward(self, features, boxes: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """ImageFeatures, boxes [B, K, 4] -> (pixel outputs [B, C_k, h, w] (with the towers'
        ``edges`` when they have object maps), token outputs [B, C_k, G, G], object logits [B, K, C_k])."""
        from refvlm_core.roi import roi_grid

        form, colour, maps = self.layout.split(features.pyramid)
        out = self.pixel_head(F.relu(self.pixel_decoder(form)))
        pixel = dict(zip(self.pixel_sizes, out.split(list(self.pixel_sizes.values()), dim=1)))
        if self.colour_pixel_head is not None:
            pixel["color"] = self.colour_pixel_head(colour[0])
        if maps is not None:
            pixel["centre"], pixel["edges"] = maps[:, :1], maps[:, 1:]
        tokens = self.token_head(features.patch_tokens)                            # [B, G*G, C]
        grid = int(math.isqrt(tokens.shape[1]))
        tokens = tokens.transpose(1, 2).unflatten(-1, (grid, grid))
        colour_rois = roi_grid(colour or form, boxes, self.roi_grid_size)
        form_rois = roi_grid(form, boxes, self.roi_grid_size)
        objects = {name: head(colour_rois if name == "color" else form_rois)
                   for name, head in self.object_heads.items()}
        return (pixel, dict(zip(self.token_sizes, tokens.split(list(self.token_sizes.values()), dim=1))), objects)


def dense_losses(pixel: dict[str, Tensor], tokens: dict[str, Tensor], objects: dict[str, Tensor],
                 targets: DenseTargets) -> dict[str, Tensor]:
    """Cross-entropy per attribute on object pixels and per object, BCE for objects and the
    centre heatmap, log-depth L1."""
    size = targets.color.shape[-2:]

    def up(x: Tensor) -> Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    losses = {}
    for name in ATTRIBUTES:
        losses[f"loss_{name}"] = F.cross_entropy(up(pixel[name]), getattr(targets, name), ignore_index=IGNORE)
    for name in tokens:
        losses[f"loss_token_{name}"] = F.cross_entropy(up(tokens[name]), getattr(targets, name), ignore_index=IGNORE)
    for column, name in enumerate(ATTRIBUTES):
        labels = targets.labels[..., column]
        logits = objects[name].flatten(0, 1)
        losses[f"loss_object_{name}"] = (F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE)
                                         if bool((labels != IGNORE).any()) else logits.sum() * 0)
    for name in ("objects", "centre"):
        losses[f"loss_{name}"] = F.binary_cross_entropy_with_logits(up(pixel[name])[:, 0], getattr(targets, name))
    if "edges" in pixel:  # the towers' object maps: box edges seen from each object pixel
        known = torch.isfinite(targets.edges)
        error = (up(pixel["edges"]) - torch.nan_to_num(targets.edges)).abs()
        losses["loss_edges"] = (error * known).sum() / known.sum().clamp(min=1)
    valid = torch.isfinite(targets.depth) & (targets.depth > 0)
    log_depth = up(pixel["depth"])[:, 0]  # predicts log metres
    safe = torch.where(valid, targets.depth, torch.ones_like(targets.depth)).log()
    losses["loss_depth"] = ((log_depth - safe).abs() * valid).sum() / valid.sum().clamp(min=1)
    return losses


@torch.no_grad()
def foreground_accuracy(pixel: dict[str, Tensor], objects: dict[str, Tensor],
                        targets: DenseTargets) -> dict[str, float]:
    """Per-pixel colour and shape accuracy on object pixels, and per-object accuracy of
    every attribute (what the card reports)."""
    size = targets.color.shape[-2:]
    fg = targets.shape != IGNORE
    out = {}
    for name in ("color", "shape"):
        pred = F.interpolate(pixel[name], size=size, mode="bilinear", align_corners=False).argmax(1)
        out[f"acc_{name}"] = float((pred == getattr(targets, name))[fg].float().mean()) if fg.any() else 0.0
    for column, name in enumerate(ATTRIBUTES):
        labels = targets.labels[..., column]
        known = labels != IGNORE
        hits = objects[name].argmax(-1) == labels
        out[f"acc_object_{name}"] = float(hits[known].float().mean()) if known.any() else 0.0
    return out


def jitter_brightness(images: Tensor, amount: float, generator: torch.Generator | None = None) -> Tensor:
    """Each image times a gain drawn from [1 - amount, 1 + amount], clipped to [0, 1]: a
    colour's luminance then varies from scene to scene, so the luminance pathway cannot use
    brightness as a stand-in for colour (hue, which the colour pathway reads, is kept)."""
    if amount <= 0:
        return images
    gains = 1 + (torch.rand(images.shape[0], 1, 1, 1, generator=generator) * 2 - 1) * amount
    return (images * gains.to(images.device)).clamp(0, 1)


# ---- the stage's step (loop.fit runs it) ---------------------------------------------

@functools.lru_cache(maxsize=2)
def _epoch_order(scenes: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(scenes)


def _scene_order(scenes: int, seed: int, step: int, batch: int) -> list[int]:
    """Scene indices of one step: a fresh permutation per epoch, a pure function of the step."""
    start = step * batch
    return [int(_epoch_order(scenes, seed, position // scenes)[position % scenes])
            for position in range(start, start + batch)]


class TowerPretrainer:
    """Stage 0's ``StageRunner``: the towers and dense heads, one step per batch of rendered
    scenes; its checkpoint holds both, the optimizer and the scheduler; scenes and brightness gains
    are pure functions of the step, so a resumed run takes the same steps as an unbroken one."""

    def __init__(self, cfg) -> None:
        from refvlm_core.config import preset
        from refvlm_core.encoders import DualImageEncoder
        from refvlm_training.engine.optim import build_optimizer, build_scheduler
        from refvlm_training.engine.stages import with_overrides

        if cfg.model.preset is None:
            raise ConfigError("stage 0 builds the towers from model.preset (+ overrides); set model.preset")
        self.cfg, self.out, self.step = cfg, Path(cfg.out), 0
        torch.manual_seed(cfg.seed)
        vision = with_overrides(preset(cfg.model.preset), cfg.model.overrides).vision
        self.encoder = DualImageEncoder(vision).set_trainable(True)
        self.heads = DenseHeads(self.encoder.layout, self.encoder.vit_width, cfg.vision_pretrain.head_dim)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = nn.ModuleDict({"encoder": self.encoder, "heads": self.heads}).to(self.device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.steps)
        self.data = SceneTargets(cfg.vision_pretrain.scenes, cfg.vision_pretrain.width, cfg.vision_pretrain.height,
                                 vision.image_size, cfg.seed)
        self._batches = None  # started at the first step, from the (resumed) step on

    def resume(self) -> int:
        from refvlm_training.engine import train_state as ckpt
        from refvlm_training.engine.loop import resume_metrics

        state = ckpt.load_checkpoint(ckpt.checkpoint_path(self.out))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # moments follow the parameters' device
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"][0])
        self.step = int(state["step"])
        resume_metrics(self.out, self.step)
        return self.step

    def train_step(self) -> dict[str, float]:
        from refvlm_training.engine.trainer import to_device

        if self._batches is None:
            self._batches = _prefetch(self.data, self.cfg, self.step)
        vp = self.cfg.vision_pretrain
        targets = to_device(next(self._batches), self.device)
        # gains drawn from the step's own stream, as the scenes are: a resumed run draws the same
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        images = jitter_brightness(targets.image, vp.brightness_jitter, generator)
        pixel, tokens, objects = self.heads(self.encoder(images), targets.boxes)
        losses = dense_losses(pixel, tokens, objects, targets)
        loss = sum(vp.loss_weights.get(name.removeprefix("loss_"), 1.0) * value for name, value in losses.items())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or float("inf")))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()},
                **foreground_accuracy(pixel, objects, targets), "grad_norm": grad_norm,
                "lr": self.scheduler.get_last_lr()[0]}

    def save_checkpoint(self) -> None:
        from refvlm_training.engine import train_state as ckpt

        ckpt.save_checkpoint(ckpt.checkpoint_path(self.out), step=self.step, model_sd=self.model.state_dict(),
                             optim_sd=self.optimizer.state_dict(), scheduler_sd=self.scheduler.state_dict(),
                             rng_states=[ckpt.rng_state()], loader_states=[{"step": self.step}],
                             extra={"config": self.cfg.to_dict()})
        print(f"checkpoint step {self.step}", flush=True)

    def save_model(self) -> Path:
        from refvlm_training.engine.loop import MODEL_DIR

        return save_towers(self.encoder, self.heads, self.out / MODEL_DIR)


def _bar_postfix(metrics: dict[str, float]) -> dict[str, str]:
    return {"loss": f"{metrics['loss']:.3g}", "color": f"{metrics['acc_color']:.2f}",
            "shape": f"{metrics['acc_shape']:.2f}"}


def pretrain_towers(cfg, resume: bool = False, progress: bool = True):
    """Run (or resume) stage 0 as configured by a TrainConfig (stage 0)."""
    from refvlm_training.engine.loop import fit

    runner = TowerPretrainer(cfg)
    if resume:
        runner.resume()
    return fit(runner, cfg, progress=progress, postfix=_bar_postfix)


def _prefetch(data: SceneTargets, cfg, step: int):
    """Batches from ``step`` on; rendering runs in worker processes when data.num_workers > 0."""
    batch = cfg.batch_size
    sampler = [_scene_order(len(data), cfg.seed, s, batch) for s in range(step, cfg.steps)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate_targets,
                                         num_workers=cfg.data.num_workers)
    return iter(loader)


def save_towers(encoder, heads: nn.Module, folder: Path) -> Path:
    """Tower weights as two safetensors files (the config's vit_weights / convnext_weights)
    plus the heads, each written atomically."""
    from safetensors.torch import save_file

    from refvlm_core.atomic import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    # the colour pathway and object maps (if any) travel in the ConvNeXt's file: all make the pyramid
    files = {"vit": {"": encoder.vit},
             "convnext": {"convnext.": encoder.convnext, "colour_pathway.": encoder.colour,
                          "object_maps.": encoder.object_maps},
             "dense_heads": {"": heads}}
    for name, modules in files.items():
        tensors = {prefix + k: v.detach().cpu().contiguous().clone()
                   for prefix, module in modules.items() if module is not None
                   for k, v in module.state_dict().items()}
        atomic_write(folder / f"{name}.safetensors", lambda tmp, t=tensors: save_file(t, tmp))
    (folder / "vision.json").write_text(json.dumps({"vit_weights": "vit.safetensors",
                                                    "convnext_weights": "convnext.safetensors"}, indent=2))
    return folder
