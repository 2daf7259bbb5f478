"""Latent Embeddings Router: sends each <REF> embedding to the decoder of every unit
named in its <Unit> block, grouped per image and padded to L = router_length.

Routing is by what the model generated (the parsed <Unit> tag), not by the task or the
system prompt. Every requested unit gets an entry even when no <REF> goes to it, so
every decoder still runs forward and contributes a zero, graph-connected loss (a
decoder skipped on one rank would hang distributed training).

This module also holds ``UnitTargets``, the per-image, per-unit ground truth the
processor builds for the decoders' losses.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from refvlm_core.errors import InputError

PAD = -1  # ordinal / group id of a padding slot


@dataclass
class RoutedRefs:
    """The <REF> embeddings routed to one unit, padded to L per image."""

    embeddings: Tensor  # [B, L, D] latent embeddings, zeros at padding
    valid: Tensor       # [B, L] bool
    ordinals: Tensor    # [B, L] long: the <REF>'s ordinal in its image's text, -1 at padding
    group_ids: Tensor   # [B, L] long: the <REF>'s unit-block index, -1 at padding

    @property
    def num_refs(self) -> int:
        return int(self.valid.sum())


@dataclass
class UnitTargets:
    """Ground truth of one unit for one image, in the normalised model frame.

    ``group_ids[i]`` is the unit-block index of instance i: instances are matched only
    to <REF>s of the same block (grouped Hungarian matching). Fields a unit does not
    use stay None. Depth is one map per image: every depth <REF> of the image is
    supervised by it (no matching), so ``group_ids`` only lists the depth blocks.
    """

    group_ids: Tensor                  # [M] long
    boxes: Tensor | None = None        # [M, 4] cx, cy, w, h in [0, 1]
    masks: Tensor | None = None        # [M, h, w] float 0/1
    keypoints: Tensor | None = None    # [M, 17, 3] x, y in [0, 1], v (0 absent, 1 occluded, 2 visible)
    depth: Tensor | None = None        # [h, w] metres, NaN unknown

    @property
    def count(self) -> int:
        return int(self.group_ids.shape[0])


def route(
    ref_embeddings: list[Tensor],
    ref_units: list[list[tuple[str, ...]]],
    ref_groups: list[list[int]],
    units: Sequence[str],
    router_length: int = 100,
    pad_to_longest: bool = False,
) -> dict[str, RoutedRefs]:
    """Group <REF> embeddings by unit.

    ref_embeddings: per image [n_b, D], in ordinal order.
    ref_units:      per image, per <REF>: the units of its <Unit> block (e.g. ("box", "mask")).
    ref_groups:     per image, per <REF>: its unit-block index.
    units:          the units to route to (usually the registered decoders).
    Returns unit -> RoutedRefs with L = router_length (with ``pad_to_longest``: L = the unit's most
    <REF>s in one image, at least 1 and at most router_length; the decoders give the same outputs
    for the valid refs, and training does not pay for padding). A composite block goes to each of its
    units; <REF>s beyond router_length for one unit are dropped with a warning; units not in
    ``units`` are dropped with a warning.
    """
    _check_route_inputs(ref_embeddings, ref_units, ref_groups, router_length)
    unknown = {u for per_image in ref_units for block in per_image for u in block} - set(units)
    if unknown:
        warnings.warn(f"<REF>s of units {sorted(unknown)} have no decoder and are not decoded; "
                      f"decoders exist for {sorted(units)}", stacklevel=2)
    def length(unit: str) -> int:
        if not pad_to_longest:
            return router_length
        counts = [sum(unit in block for block in per_image) for per_image in ref_units]
        return max(1, min(router_length, max(counts)))

    return {unit: _route_one_unit(ref_embeddings, ref_units, ref_groups, unit, length(unit)) for unit in units}


def _route_one_unit(ref_embeddings: list[Tensor], ref_units: list[list[tuple[str, ...]]],
                    ref_groups: list[list[int]], unit: str, router_length: int) -> RoutedRefs:
    rows, ordinals, groups = [], [], []
    for b, (emb, per_ref_units, per_ref_groups) in enumerate(zip(ref_embeddings, ref_units, ref_groups)):
        picked = [i for i, block_units in enumerate(per_ref_units) if unit in block_units]
        if len(picked) > router_length:
            warnings.warn(f"image {b}: {len(picked)} <REF>s for unit '{unit}' exceed "
                          f"router_length={router_length}; decoding the first {router_length} "
                          f"(raise router_length to keep them all)", stacklevel=3)
            picked = picked[:router_length]
        pad = router_length - len(picked)
        index = torch.tensor(picked, dtype=torch.long, device=emb.device)
        rows.append(torch.cat([emb.index_select(0, index), emb.new_zeros(pad, emb.shape[1])]))  # [L, D]
        ordinals.append(picked + [PAD] * pad)
        groups.append([per_ref_groups[i] for i in picked] + [PAD] * pad)
    device = ref_embeddings[0].device
    ordinal_t = torch.tensor(ordinals, dtype=torch.long, device=device).view(len(rows), router_length)
    return RoutedRefs(
        embeddings=torch.stack(rows),  # [B, L, D]
        valid=ordinal_t >= 0,
        ordinals=ordinal_t,
        group_ids=torch.tensor(groups, dtype=torch.long, device=device).view(len(rows), router_length),
    )


def _check_route_inputs(ref_embeddings: list[Tensor], ref_units: list[list[tuple[str, ...]]],
                        ref_groups: list[list[int]], router_length: int) -> None:
    if router_length < 1:
        raise InputError(f"router_length must be >= 1, got {router_length}")
    if not ref_embeddings:
        raise InputError("route() needs at least one image (pass a [0, D] tensor for an image without <REF>s)")
    if not len(ref_embeddings) == len(ref_units) == len(ref_groups):
        raise InputError(f"route(): per-image lists differ in length: {len(ref_embeddings)} embeddings, "
                         f"{len(ref_units)} unit lists, {len(ref_groups)} group lists; pass one entry per image")
    dims = {emb.shape[-1] for emb in ref_embeddings}
    for b, (emb, per_ref_units, per_ref_groups) in enumerate(zip(ref_embeddings, ref_units, ref_groups)):
        if emb.dim() != 2 or len(dims) != 1:
            raise InputError(f"image {b}: ref embeddings must be [n, D] with one D for all images, "
                             f"got shape {tuple(emb.shape)} (widths seen: {sorted(dims)})")
        if not emb.shape[0] == len(per_ref_units) == len(per_ref_groups):
            raise InputError(f"image {b}: {emb.shape[0]} <REF> embeddings but {len(per_ref_units)} unit entries "
                             f"and {len(per_ref_groups)} group entries; each <REF> needs one of each")
        for block_units in per_ref_units:
            if isinstance(block_units, str):
                raise InputError(f"image {b}: units must be tuples of names such as ('box',), got the string "
                                 f"{block_units!r}")
