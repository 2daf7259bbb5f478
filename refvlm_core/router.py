"""Latent Embeddings Router: sends each <REF> embedding to the decoder of every unit
named in its <Unit> block, grouped per image and padded to L = router_length.

Routing is by what the model generated (the parsed <Unit> tag), not by the task or the
system prompt. Every requested unit gets an entry even when no <REF> goes to it, so
every decoder still runs forward and contributes a zero, graph-connected loss (a
decoder skipped on one rank would hang distributed training).
"""
from __future__ import annotations

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
    units; <REF>s beyond router_length for one unit and units not in ``units`` are dropped
    (``routing_problems`` says which, for the caller to report).
    """
    _check_route_inputs(ref_embeddings, ref_units, ref_groups, router_length)

    def length(unit: str) -> int:
        if not pad_to_longest:
            return router_length
        counts = [sum(unit in block for block in per_image) for per_image in ref_units]
        return max(1, min(router_length, max(counts)))

    return {unit: _route_one_unit(ref_embeddings, ref_units, ref_groups, unit, length(unit)) for unit in units}


def routing_problems(ref_units: list[list[tuple[str, ...]]], units: Sequence[str],
                     router_length: int) -> list[str]:
    """What ``route`` drops, in words: <REF>s of units without a decoder, and <REF>s beyond
    ``router_length`` for one unit in one image."""
    problems = []
    unknown = {u for per_image in ref_units for block in per_image for u in block} - set(units)
    if unknown:
        problems.append(f"no decoder for unit(s) {sorted(unknown)}; their <REF>s are not decoded "
                        f"(decoders exist for {sorted(units)})")
    for b, per_image in enumerate(ref_units):
        for unit in units:
            count = sum(unit in block for block in per_image)
            if count > router_length:
                problems.append(f"image {b}: {count} <REF>s for unit '{unit}' exceed router_length="
                                f"{router_length}; decoded the first {router_length} (raise "
                                "ModelConfig.router_length to keep them all)")
    return problems


def _route_one_unit(ref_embeddings: list[Tensor], ref_units: list[list[tuple[str, ...]]],
                    ref_groups: list[list[int]], unit: str, router_length: int) -> RoutedRefs:
    rows, ordinals, groups = [], [], []
    for b, (emb, per_ref_units, per_ref_groups) in enumerate(zip(ref_embeddings, ref_units, ref_groups)):
        picked = [i for i, block_units in enumerate(per_ref_units) if unit in block_units]
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
