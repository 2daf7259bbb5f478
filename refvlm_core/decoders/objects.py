"""Object-centric decoders: each <REF> chooses among the objects the towers found.

Regressing a box from a query alone stayed at chance on the nano model, and even a dense
query-to-pixel heatmap learns localisation from one box per question. The towers' object
maps (``vision.object_maps``) are learnt in stage 0 from every object of every scene: their
peaks are class-agnostic proposals, each with its box. A decoder of kind "objects" then only
has to choose (docs/model_probes.md: choosing among a scene's true objects learnt where
regressing did not):

1. proposals: the ``num_objects`` highest peaks of the centre map (3x3 local maxima), each
   with the box its edge distances give;
2. each proposal described by its ROI grid of the pyramid (shape from the form channels,
   colour from the colour pathway's) and its box; or, with ``attributes``, by what linear
   heads read from that grid (colour from the colour channels, shape, material and size
   from the form channels: stage 0's object heads, loaded with ``model.load_parts`` and not
   trained further) and its box. A chooser over the raw grid fits the train scenes and not
   the held-out colour x shape pairs (docs/model_probes.md, "Finding vs choosing");
3. per <REF>, one sequence [query, object_1 .. object_K] through a few self-attention
   layers, so objects see each other and the question at once ("left of the sphere",
   "the largest cone");
4. the query scores each object (``selection_logits``); the chosen one (hard in the
   forward pass, soft gradient: straight-through) gives the box (refined by a small delta),
   and its token and box condition the mask and keypoint heatmaps, which are also confined
   to its box.

Each decoder keeps its unit's outputs, losses (plus the choice's cross-entropy towards the
proposal that best covers the target), postprocessing and export: kinds "objects" of the
box, mask and keypoint units.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refvlm_core.decoders.base import UnitDecoder, register_decoder
from refvlm_core.decoders.box import BoxDecoder
from refvlm_core.decoders.keypoint import NUM_KEYPOINTS, KeypointDecoder
from refvlm_core.decoders.layers import (MLP, Attention, PixelDecoder, RefQueries, cell_centres, dot_heatmap,
                                         soft_argmax)
from refvlm_core.decoders.mask import MaskDecoder
from refvlm_core.geometry import box_iou, cxcywh_to_xyxy, xyxy_to_cxcywh
from refvlm_core.losses import box_giou_loss, box_l1_loss, connected_zero
from refvlm_core.matching import (box_cost, grouped_hungarian, matched_predictions, matched_targets, pad_groups,
                                  pad_stack)
from refvlm_core.roi import roi_channels, roi_grid
from refvlm_core.router import RoutedRefs
from refvlm_core.targets import UnitTargets

MAP_CHANNELS = 5  # refvlm_core.encoders.OBJECT_MAP_CHANNELS: centre logit, log distances to 4 edges


def proposals(maps: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Object maps [B, 5, h, w] -> the ``count`` strongest centre peaks: boxes [B, K, 4] xyxy
    in [0, 1] and objectness [B, K] in [0, 1] (0 for a cell that is no local maximum)."""
    b, _, h, w = maps.shape
    centre = maps[:, 0].sigmoid()                                                  # [B, h, w]
    peaks = centre * (centre == F.max_pool2d(centre[:, None], 3, 1, 1)[:, 0]).to(centre.dtype)
    scores, index = peaks.flatten(1).topk(min(count, h * w), dim=1)                # [B, K]
    xs, ys = cell_centres(h, w, maps).flatten(0, 1)[index].unbind(-1)              # [B, K] each
    edges = maps[:, 1:].flatten(2).gather(2, index[:, None].expand(-1, 4, -1)).exp()   # [B, 4, K] l, t, r, b
    boxes = torch.stack([xs - edges[:, 0], ys - edges[:, 1], xs + edges[:, 2], ys + edges[:, 3]], dim=-1)
    return boxes.clamp(0, 1), scores


def box_prior(boxes: Tensor, h: int, w: int, margin: float = 0.1) -> Tensor:
    """boxes [B, L, 4] xyxy -> [B, L, h, w] log of a soft window over each box (grown by
    ``margin`` of its size), a third of a cell wide at its edges: 0 inside, very negative far out."""
    size = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    lo, hi = boxes[..., :2] - margin * size, boxes[..., 2:] + margin * size       # [B, L, 2]
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5          # cell units
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5

    def window(t: Tensor, a: Tensor, b: Tensor, cells: int) -> Tensor:         # [B, L, n]
        return log_sigmoid(3 * (t - a[..., None] * cells)) + log_sigmoid(3 * (b[..., None] * cells - t))

    return window(ys, lo[..., 1], hi[..., 1], h)[..., :, None] + window(xs, lo[..., 0], hi[..., 0], w)[..., None, :]


def log_sigmoid(x: Tensor) -> Tensor:
    """log(sigmoid(x)) in plain ops, stable for any x (ONNX Runtime's LogSigmoid lost about 7
    at x = -43, enough to move a mask logit)."""
    return torch.clamp(x, max=0) - torch.log1p(torch.exp(-x.abs()))


class JointLayer(nn.Module):
    """Pre-norm self-attention over [query, objects] and an FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.ffn = MLP(dim, ffn_dim, dim, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norms[0](x)
        x = x + self.attn(h, h, h)
        return x + self.ffn(self.norms[1](x))


class ObjectChooser(nn.Module):
    """The shared trunk: <REF> queries choose among the towers' object proposals.

    ``attributes`` (name -> classes, e.g. {"color": 8, "shape": 5}): describe each proposal by
    these heads' class probabilities instead of its ROI grid; "color" reads the last
    ``colour_channels`` channels of each level (the colour pathway), the others the rest.
    ``forward`` returns a dict: ``proposals`` [B, K, 4] xyxy, ``objectness`` [B, K],
    ``selection_logits`` [B, L, K], ``chosen_box`` [B, L, 4] xyxy, ``query`` [B, L, D] (the
    query after reasoning, plus the chosen object's token) and, with ``pixel_dim``, ``pixels``
    [B, C, h0, w0] (an FPN of the feature channels, for heatmaps).
    """

    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], hidden_dim: int, num_heads: int,
                 num_layers: int, ffn_dim: int, num_objects: int, roi_grid_size: int, ref_norm: str,
                 pixel_dim: int | None = None, attributes: dict[str, int] | None = None,
                 colour_channels: int = 0) -> None:
        super().__init__()
        if pyramid_channels[0] <= MAP_CHANNELS:
            raise ValueError("an 'objects' decoder needs towers with object maps (vision.object_maps: true)")
        self.feature_channels = [pyramid_channels[0] - MAP_CHANNELS, *pyramid_channels[1:]]
        self.num_objects, self.roi_grid_size = num_objects, roi_grid_size
        self.queries = RefQueries(llm_dim, hidden_dim, ref_norm)
        self.colour_channels = colour_channels
        self.attribute_heads = None
        if attributes:
            form = [c - colour_channels for c in self.feature_channels]
            colour = [colour_channels] * len(form) if colour_channels else form
            self.attribute_heads = nn.ModuleDict({
                name: nn.Linear(roi_channels(colour if name == "color" else form, roi_grid_size), classes)
                for name, classes in attributes.items()})
            self.object_embed = nn.Sequential(MLP(sum(attributes.values()), hidden_dim, hidden_dim, 2),
                                              nn.LayerNorm(hidden_dim))
        else:
            self.object_embed = nn.Sequential(nn.Linear(roi_channels(self.feature_channels, roi_grid_size),
                                                        hidden_dim), nn.LayerNorm(hidden_dim))
        self.box_embed = MLP(5, hidden_dim, hidden_dim, 2)                      # cx, cy, w, h, objectness
        self.layers = nn.ModuleList(JointLayer(hidden_dim, num_heads, ffn_dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_dim)
        self.select_query, self.select_object = nn.Linear(hidden_dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim)
        self.pixel_decoder = PixelDecoder(self.feature_channels, hidden_dim, pixel_dim) if pixel_dim else None

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        levels = [pyramid[0][:, :-MAP_CHANNELS], *pyramid[1:]]
        boxes, objectness = proposals(pyramid[0][:, -MAP_CHANNELS:], self.num_objects)   # [B, K, 4], [B, K]
        objects = self.object_embed(self.describe(levels, boxes))
        objects = objects + self.box_embed(torch.cat([xyxy_to_cxcywh(boxes), objectness[..., None]], -1))  # [B, K, D]
        content, position = self.queries(ref_embeddings, ref_valid)
        query = content + position                                              # [B, L, D]
        b, l, d = query.shape
        k = objects.shape[1]
        x = torch.cat([query[:, :, None], objects[:, None].expand(b, l, k, d)], dim=2).flatten(0, 1)  # [B*L, 1+K, D]
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x).unflatten(0, (b, l))                                   # [B, L, 1+K, D]
        query, objects = x[:, :, 0], x[:, :, 1:]
        logits = torch.einsum("bld,blkd->blk", self.select_query(query), self.select_object(objects)) / math.sqrt(d)
        weights = straight_through_choice(logits)                               # [B, L, K]
        out = {"proposals": boxes, "objectness": objectness, "selection_logits": logits,
               "chosen_box": torch.einsum("blk,bkc->blc", weights, boxes),
               "query": query + torch.einsum("blk,blkd->bld", weights, objects)}
        if self.pixel_decoder is not None:
            out["pixels"] = self.pixel_decoder(levels)
        return out

    def describe(self, levels: list[Tensor], boxes: Tensor) -> Tensor:
        """Feature levels, boxes [B, K, 4] -> [B, K, F]: each box's ROI grid, or its attribute probabilities."""
        if self.attribute_heads is None:
            return roi_grid(levels, boxes, self.roi_grid_size)
        split = [level.shape[1] - self.colour_channels for level in levels]
        form = roi_grid([level[:, :c] for level, c in zip(levels, split)], boxes, self.roi_grid_size)
        colour = roi_grid([level[:, c:] for level, c in zip(levels, split)], boxes, self.roi_grid_size) \
            if self.colour_channels else form
        # detached: the heads stay as stage 0 trained them on every object of every scene;
        # trained on choices they would learn the train scenes' colour x shape pairs again
        return torch.cat([head(colour if name == "color" else form).softmax(-1).detach()
                          for name, head in self.attribute_heads.items()], dim=-1)


def straight_through_choice(logits: Tensor) -> Tensor:
    """[..., K] -> one-hot of the argmax in the forward pass, softmax's gradient in the backward."""
    soft = logits.softmax(dim=-1)
    hard = F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach()


def selection_loss(logits: Tensor, proposal_boxes: Tensor, matches: list, target_boxes: list[Tensor],
                   min_iou: float = 0.1) -> Tensor:
    """Cross-entropy of each matched ref's choice towards the proposal that best covers its
    target's box (xyxy); refs whose target no proposal covers by ``min_iou`` are left out."""
    src, goal = [], []
    for b, (pred, tgt) in enumerate(matches):
        if len(pred) == 0:
            continue
        iou = box_iou(target_boxes[b][tgt.to(logits.device)], proposal_boxes[b])   # [M, K]
        best, index = iou.max(dim=1)
        keep = best >= min_iou
        src.append(logits[b, pred.to(logits.device)[keep]])
        goal.append(index[keep])
    if not src or sum(len(g) for g in goal) == 0:
        return logits.sum() * 0
    return F.cross_entropy(torch.cat(src), torch.cat(goal))


def _chooser(decoder, llm_dim, pyramid_channels, hidden_dim, num_heads, num_layers, ffn_dim, num_objects,
             roi_grid_size, pixel_dim, attributes, colour_channels) -> ObjectChooser:
    return ObjectChooser(llm_dim, pyramid_channels, hidden_dim, num_heads, num_layers, ffn_dim or 4 * hidden_dim,
                         num_objects, roi_grid_size, decoder.ref_norm, pixel_dim, attributes, colour_channels)


def choice_loss(decoder: UnitDecoder, outputs: dict[str, Tensor], routed: RoutedRefs, targets: list[UnitTargets],
                extent) -> dict[str, Tensor]:
    """``{"loss_<unit>_select": ...}`` for a mask or keypoint decoder: the choice towards the
    proposal covering each target's ``extent`` (its box, xyxy)."""
    like = outputs["selection_logits"]
    boxes = [extent(t.value.to(like)) if t.value is not None and len(t.value) else like.new_zeros(0, 4)
             for t in targets]
    loss = decoder.weights.select * _select_by_iou(outputs, routed, targets, boxes)
    return {f"loss_{decoder.unit}_select": loss + connected_zero(outputs)}


@register_decoder("box", kind="objects")
class ObjectBoxDecoder(BoxDecoder):
    """The chosen proposal's box, refined by a delta from the query and the object's token."""

    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], hidden_dim: int = 128, num_heads: int = 4,
                 num_layers: int = 2, ffn_dim: int | None = None, num_objects: int = 16, roi_grid_size: int = 3,
                 attributes: dict[str, int] | None = None, colour_channels: int = 0, **kwargs: Any) -> None:
        UnitDecoder.__init__(self, llm_dim, pyramid_channels, **kwargs)
        self.trunk = _chooser(self, llm_dim, pyramid_channels, hidden_dim, num_heads, num_layers, ffn_dim,
                              num_objects, roi_grid_size, None, attributes, colour_channels)
        self.refine = MLP(hidden_dim, hidden_dim, 4, 2)
        nn.init.zeros_(self.refine.layers[-1].weight)
        nn.init.zeros_(self.refine.layers[-1].bias)

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        chosen = self.trunk(ref_embeddings, ref_valid, pyramid)
        box = xyxy_to_cxcywh(chosen["chosen_box"])                             # [B, L, 4]
        delta = 0.1 * torch.tanh(self.refine(chosen["query"]))
        boxes = torch.cat([box[..., :2] + delta[..., :2] * box[..., 2:], box[..., 2:] * delta[..., 2:].exp()], -1)
        # the score is the choice's confidence, log p / (1 - p) of the chosen object
        logits = chosen["selection_logits"]
        top = logits.max(dim=-1).values
        score = top - torch.logsumexp(logits.masked_fill(logits >= top[..., None], -1e4), dim=-1)
        outputs = {"boxes": boxes.clamp(0, 1), "scores": score}
        if self.training:
            outputs.update(selection_logits=logits, proposals=chosen["proposals"])
        return outputs

    def loss(self, outputs: dict[str, Tensor], routed: RoutedRefs, targets: list[UnitTargets]) -> dict[str, Tensor]:
        boxes = self.check_targets(routed, targets)
        w, zero = self.weights, connected_zero(outputs)
        names = ("loss_box_l1", "loss_box_giou", "loss_box_select")
        if sum(t.count for t in targets) == 0 or not bool(routed.valid.any()):
            return dict.fromkeys(names, zero)
        pred = outputs["boxes"]
        boxes = [b.to(pred) if b is not None else pred.new_zeros(0, 4) for b in boxes]
        groups = [t.group_ids.to(pred.device) for t in targets]
        cost = box_cost(pred.detach(), pad_stack(boxes), self.costs.box_l1, self.costs.box_giou)
        matches = grouped_hungarian(cost, routed.group_ids, pad_groups(groups))
        tgt = matched_targets(boxes, matches)
        src = matched_predictions(pred, matches)
        num = max(tgt.shape[0], 1)
        select = selection_loss(outputs["selection_logits"], outputs["proposals"], matches,
                                [cxcywh_to_xyxy(b) for b in boxes])
        return {"loss_box_l1": w.box_l1 * box_l1_loss(src, tgt, num) + zero,
                "loss_box_giou": w.box_giou * box_giou_loss(src, tgt, num) + zero,
                "loss_box_select": w.select * select + zero}


@register_decoder("mask", kind="objects")
class ObjectMaskDecoder(MaskDecoder):
    """The chosen object's mask: its token dotted with the pixels, confined to its box."""

    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], hidden_dim: int = 128, num_heads: int = 4,
                 num_layers: int = 2, ffn_dim: int | None = None, num_objects: int = 16, roi_grid_size: int = 3,
                 mask_dim: int | None = None, attributes: dict[str, int] | None = None, colour_channels: int = 0,
                 **kwargs: Any) -> None:
        UnitDecoder.__init__(self, llm_dim, pyramid_channels, **kwargs)
        mask_dim = mask_dim or hidden_dim
        self.trunk = _chooser(self, llm_dim, pyramid_channels, hidden_dim, num_heads, num_layers, ffn_dim,
                              num_objects, roi_grid_size, mask_dim, attributes, colour_channels)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        chosen = self.trunk(ref_embeddings, ref_valid, pyramid)
        pixels = chosen["pixels"]
        logits = dot_heatmap(self.mask_embed(chosen["query"])[None], pixels)[0]     # [B, L, h, w]
        logits = logits + box_prior(chosen["chosen_box"], *pixels.shape[-2:])
        outputs = {"mask_logits": logits.clamp(min=-50.0)}
        if self.training:
            outputs.update(selection_logits=chosen["selection_logits"], proposals=chosen["proposals"])
        return outputs

    def loss(self, outputs: dict[str, Tensor], routed: RoutedRefs, targets: list[UnitTargets]) -> dict[str, Tensor]:
        return {**super().loss(outputs, routed, targets), **choice_loss(self, outputs, routed, targets, mask_extent)}


@register_decoder("keypoint", kind="objects")
class ObjectKeypointDecoder(KeypointDecoder):
    """The chosen person's keypoints: heatmaps from its token, confined to its box."""

    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], hidden_dim: int = 128, num_heads: int = 4,
                 num_layers: int = 2, ffn_dim: int | None = None, num_objects: int = 16, roi_grid_size: int = 3,
                 pixel_dim: int | None = None, attributes: dict[str, int] | None = None, colour_channels: int = 0,
                 **kwargs: Any) -> None:
        UnitDecoder.__init__(self, llm_dim, pyramid_channels, **kwargs)
        self.pixel_dim = pixel_dim or hidden_dim
        self.trunk = _chooser(self, llm_dim, pyramid_channels, hidden_dim, num_heads, num_layers, ffn_dim,
                              num_objects, roi_grid_size, self.pixel_dim, attributes, colour_channels)
        self.point_embed = MLP(hidden_dim, hidden_dim, NUM_KEYPOINTS * self.pixel_dim, 2)
        self.visibility_head = MLP(hidden_dim, hidden_dim, NUM_KEYPOINTS, 2)

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        chosen = self.trunk(ref_embeddings, ref_valid, pyramid)
        pixels, query = chosen["pixels"], chosen["query"]
        embeds = self.point_embed(query).unflatten(-1, (NUM_KEYPOINTS, self.pixel_dim))   # [B, L, 17, C]
        heat = dot_heatmap(embeds[None], pixels)[0]                                       # [B, L, 17, h, w]
        heat = heat + box_prior(chosen["chosen_box"], *pixels.shape[-2:])[:, :, None]
        xy, _ = soft_argmax(heat)
        outputs = {"keypoints": xy, "visibility_logits": self.visibility_head(query)}
        if self.training:
            outputs.update(layer_keypoints=xy[None], layer_keypoint_heatmaps=heat[None],
                           selection_logits=chosen["selection_logits"], proposals=chosen["proposals"])
        return outputs

    def loss(self, outputs: dict[str, Tensor], routed: RoutedRefs, targets: list[UnitTargets]) -> dict[str, Tensor]:
        losses = super().loss(outputs, routed, targets)
        return {**losses, **choice_loss(self, outputs, routed, targets, keypoint_extent)}


def mask_extent(masks: Tensor) -> Tensor:
    """[M, h, w] coverage -> [M, 4] xyxy in [0, 1] of the covered cells (zeros for an empty mask)."""
    m, h, w = masks.shape
    on = masks > 0.5
    ys = (torch.arange(h, device=masks.device, dtype=masks.dtype) + 0.5) / h
    xs = (torch.arange(w, device=masks.device, dtype=masks.dtype) + 0.5) / w
    rows, cols = on.any(dim=2), on.any(dim=1)                                  # [M, h], [M, w]
    big = torch.tensor(2.0, dtype=masks.dtype, device=masks.device)
    x0 = torch.where(cols, xs, big).min(dim=1).values - 0.5 / w
    x1 = torch.where(cols, xs, -big).max(dim=1).values + 0.5 / w
    y0 = torch.where(rows, ys, big).min(dim=1).values - 0.5 / h
    y1 = torch.where(rows, ys, -big).max(dim=1).values + 0.5 / h
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    return torch.where(on.flatten(1).any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


def keypoint_extent(keypoints: Tensor, grow: float = 0.15) -> Tensor:
    """[M, 17, 3] x, y in [0, 1], v -> [M, 4] xyxy around the labelled keypoints, grown by
    ``grow`` of its size (a skeleton's extent is a little inside the person's box)."""
    labelled = keypoints[..., 2] > 0
    big = torch.tensor(2.0, dtype=keypoints.dtype, device=keypoints.device)
    lo = torch.where(labelled[..., None], keypoints[..., :2], big).min(dim=1).values
    hi = torch.where(labelled[..., None], keypoints[..., :2], -big).max(dim=1).values
    size = (hi - lo).clamp(min=0)
    boxes = torch.cat([lo - grow * size, hi + grow * size], dim=-1).clamp(0, 1)
    return torch.where((labelled.sum(dim=1) >= 2)[:, None], boxes, torch.zeros_like(boxes))


def _select_by_iou(outputs: dict[str, Tensor], routed: RoutedRefs, targets: list[UnitTargets],
                   target_boxes: list[Tensor]) -> Tensor:
    """The choice's cross-entropy for refs matched to targets by their choice's likelihood:
    within a phrase, refs and targets are paired to maximise sum log p(proposal covering the target)."""
    logits = outputs["selection_logits"]
    if sum(t.count for t in targets) == 0 or not bool(routed.valid.any()):
        return logits.sum() * 0
    log_p = logits.detach().log_softmax(-1)                                     # [B, L, K]
    groups = pad_groups([t.group_ids.to(logits.device) for t in targets])      # [B, Mmax]
    best = torch.zeros(groups.shape, dtype=torch.long, device=logits.device)   # proposal covering each target
    for b, boxes in enumerate(target_boxes):
        if len(boxes):
            best[b, :len(boxes)] = box_iou(boxes, outputs["proposals"][b].detach()).argmax(dim=1)
    cost = -log_p.gather(2, best[:, None, :].expand(-1, log_p.shape[1], -1))  # [B, L, Mmax]
    matches = grouped_hungarian(cost, routed.group_ids, groups)
    return selection_loss(logits, outputs["proposals"].detach(), matches, target_boxes)
