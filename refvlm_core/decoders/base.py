"""The visual-unit decoder interface and its registry.

A decoder turns the <REF> embeddings the router sent to its unit into that unit's
outputs (boxes, masks, ...), and owns everything else unit-specific: how a block's
ground truth becomes targets in the model frame (the processor calls it), its loss, and
how an output goes back to original pixels on a ``ReferredObject`` (the predictor calls
it). So a new unit is one module with a ``@register_decoder("name")`` class and no other
code change: the router routes any unit name the model writes in its ``<Unit>`` tag, the
TRP grammar allows every registered unit, and outputs with no dedicated ReferredObject
field go to ``ReferredObject.outputs`` (and the ROS message's ``outputs``). Several
implementations of one unit (the built-in mask decoder, a SAM-like one) are kinds of it,
chosen by ``ModelConfig.decoders[unit]["kind"]``.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from refvlm_core.config import MatchCosts
from refvlm_core.errors import ConfigError, InputError
from refvlm_core.geometry import Letterbox
from refvlm_core.losses import LossWeights
from refvlm_core.results import ReferredObject
from refvlm_core.router import RoutedRefs
from refvlm_core.sample import RefTarget
from refvlm_core.targets import TargetFrame, UnitTargets


class UnitDecoder(nn.Module):
    """Base class of one visual-unit decoder.

    Subclasses implement:
    - ``forward(ref_embeddings [B, L, D], ref_valid [B, L] bool, pyramid) -> dict of tensors``
      (plain tensors in and out so that ONNX export can wrap it; padded refs give finite,
      ignored outputs);
    - ``loss(outputs, routed, targets) -> dict of weighted scalar losses``, matched with
      grouped Hungarian matching, zero but graph-connected when there are no targets;
    - ``postprocess(outputs, routed) -> per image, per valid ref, a dict of numpy values``
      in the normalised model frame, each with its "ordinal" and "group";
    - ``encode_target(target, frame)``: one unit block's ground truth -> model frame;
    - ``fill_object(obj, output, letterbox)``: one ref's postprocessed output -> ``obj``.
    """

    unit: ClassVar[str] = ""
    # False: one target per image serves all its <REF>s of this unit (depth), no matching,
    # and a block's <REF> count is not tied to its instances
    instance_targets: ClassVar[bool] = True

    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int],
                 loss_weights: LossWeights | Mapping[str, float] | None = None,
                 match_costs: MatchCosts | Mapping[str, float] | None = None, ref_norm: str = "layer") -> None:
        super().__init__()
        self.ref_norm = ref_norm  # how a trunk normalises the <REF> states (decoders.layers.RefQueries)
        self.llm_dim = int(llm_dim)
        self.pyramid_channels = [int(c) for c in pyramid_channels]
        self.weights = LossWeights.coerce(loss_weights)
        self.costs = MatchCosts.coerce(match_costs)   # what matching minimises, apart from the loss weights

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def loss(self, outputs: dict[str, Tensor], routed: RoutedRefs, targets: list[UnitTargets]) -> dict[str, Tensor]:
        raise NotImplementedError

    def postprocess(self, outputs: dict[str, Tensor], routed: RoutedRefs) -> list[list[dict[str, Any]]]:
        raise NotImplementedError

    # ---- ground truth (processor) and results (predictor) ---------------------------
    def encode_target(self, target: RefTarget, frame: TargetFrame) -> np.ndarray | None:
        """One unit block's ground truth (original pixels) -> [M, ...] float32 in the
        normalised model frame, M = ``target.count`` (None: the unit has no per-block value).
        Raise InputError naming ``frame.sample.id`` when the target lacks what the unit needs."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode_target to be trained")

    def collate_targets(self, parts: list[np.ndarray], group_ids: Tensor, frame: TargetFrame) -> UnitTargets:
        """One image's encoded blocks -> its UnitTargets (instances concatenated; None if none)."""
        value = torch.from_numpy(np.concatenate(parts).astype(np.float32)) if parts else None
        return UnitTargets(group_ids=group_ids, value=value)

    def fill_object(self, obj: ReferredObject, output: dict[str, Any], letterbox: Letterbox) -> None:
        """Put one ref's postprocessed output (normalised model frame) on ``obj`` in original
        pixels: in its dedicated field when ReferredObject has one, else in ``obj.outputs``."""
        raise NotImplementedError(f"{type(self).__name__} must implement fill_object to be used for prediction")

    def check_targets(self, routed: RoutedRefs, targets: list[UnitTargets]) -> list[Tensor | None]:
        """The target value of each image (None when an image has none of this unit)."""
        if len(targets) != routed.valid.shape[0]:
            raise InputError(f"{self.unit} decoder: {len(targets)} target entries for a batch of "
                             f"{routed.valid.shape[0]} images; pass one UnitTargets per image (count 0 if none)")
        for b, target in enumerate(targets):
            if target.value is None and target.count > 0:
                raise InputError(f"{self.unit} decoder: image {b} has {target.count} {self.unit} targets "
                                 f"but no UnitTargets.value; encode_target must return them")
        return [target.value for target in targets]


def layer_weights(num_layers: int, aux: float) -> list[float]:
    """Loss weight of each decoder layer's outputs: ``aux`` for the earlier (auxiliary) ones, 1 for the last."""
    return [aux] * (num_layers - 1) + [1.0]


def valid_refs(routed: RoutedRefs) -> Iterator[tuple[int, int, dict[str, int]]]:
    """(image, slot, {"ordinal", "group"}) of every valid routed ref, image by image."""
    valid, ordinals, groups = routed.valid.cpu(), routed.ordinals.cpu(), routed.group_ids.cpu()
    for b in range(valid.shape[0]):
        for slot in valid[b].nonzero().flatten().tolist():
            yield b, slot, {"ordinal": int(ordinals[b, slot]), "group": int(groups[b, slot])}


def per_image(routed: RoutedRefs, make: Callable[[int, int], dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Postprocess helper: per image, per valid ref, ``make(b, slot)`` plus ordinal and group."""
    results: list[list[dict[str, Any]]] = [[] for _ in range(routed.valid.shape[0])]
    for b, slot, ids in valid_refs(routed):
        results[b].append({**ids, **make(b, slot)})
    return results


# ---- registry ----------------------------------------------------------------------

DEFAULT_KIND = "default"
_REGISTRY: dict[str, dict[str, type[UnitDecoder]]] = {}  # unit -> kind -> class
D = TypeVar("D", bound=type[UnitDecoder])


def register_decoder(unit: str, *, kind: str = DEFAULT_KIND, replace: bool = False) -> Callable[[D], D]:
    """Class decorator: make ``cls`` a decoder of ``unit``.

    ``kind`` names one implementation among several for a unit (``ModelConfig.decoders[unit]
    ["kind"]`` picks it; a saved model says which it was trained with). Registering an
    existing (unit, kind) raises unless ``replace=True``.
    """
    def decorate(cls: D) -> D:
        if not issubclass(cls, UnitDecoder):
            raise ConfigError(f"{cls.__name__} must subclass UnitDecoder to be registered as unit '{unit}'")
        kinds = _REGISTRY.setdefault(unit, {})
        if kind in kinds and kinds[kind] is not cls and not replace:
            raise ConfigError(f"unit '{unit}' already has decoder {kinds[kind].__name__} of kind '{kind}'; "
                              f"pass replace=True to register_decoder to swap in {cls.__name__}")
        cls.unit = unit
        kinds[kind] = cls
        return cls
    return decorate


def unregister_decoder(unit: str, kind: str | None = None) -> None:
    """Remove one kind of a unit, or the whole unit (plugins and tests with temporary units)."""
    if kind is None:
        _REGISTRY.pop(unit, None)
    else:
        _REGISTRY.get(unit, {}).pop(kind, None)
        if not _REGISTRY.get(unit, True):
            del _REGISTRY[unit]


def registered_units() -> tuple[str, ...]:
    """Names of all registered units, in registration order."""
    return tuple(_REGISTRY)


def decoder_class(unit: str, kind: str = DEFAULT_KIND) -> type[UnitDecoder]:
    if unit not in _REGISTRY:
        raise ConfigError(f"no decoder registered for unit '{unit}': registered units are "
                          f"{list(_REGISTRY)}; register one with @register_decoder('{unit}')")
    if kind not in _REGISTRY[unit]:
        raise ConfigError(f"unit '{unit}' has no decoder of kind '{kind}': its kinds are "
                          f"{list(_REGISTRY[unit])}; fix ModelConfig.decoders['{unit}']['kind']")
    return _REGISTRY[unit][kind]


def build_decoder(unit: str, llm_dim: int, pyramid_channels: Sequence[int], kind: str = DEFAULT_KIND,
                  **kwargs: Any) -> UnitDecoder:
    """Instantiate the decoder of ``unit`` (of ``kind``); kwargs come from ModelConfig.decoders[unit]
    (plus ``loss_weights`` and ``match_costs``, e.g. ModelConfig's)."""
    cls = decoder_class(unit, kind)
    try:
        return cls(llm_dim, pyramid_channels, **kwargs)
    except TypeError as error:
        raise ConfigError(f"bad settings for the '{unit}' decoder ({cls.__name__}): {error}; "
                          f"fix ModelConfig.decoders['{unit}']") from error
