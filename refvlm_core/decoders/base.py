"""The visual-unit decoder interface and its registry.

A decoder turns the <REF> embeddings the router sent to its unit into that unit's
outputs (boxes, masks, ...). Units are looked up by name, so a new unit, or an external
decoder replacing a built-in one (SAM-like mask, Grounding-DINO-like box), plugs in with
``@register_decoder("name")`` and no other code change: the router routes any unit name
the model writes in its ``<Unit>`` tag.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence, TypeVar

from torch import Tensor, nn

from refvlm_core.config import MatchCosts
from refvlm_core.errors import ConfigError, InputError
from refvlm_core.losses import LossWeights
from refvlm_core.router import RoutedRefs, UnitTargets


class UnitDecoder(nn.Module):
    """Base class of one visual-unit decoder.

    Subclasses implement:
    - ``forward(ref_embeddings [B, L, D], ref_valid [B, L] bool, pyramid) -> dict of tensors``
      (plain tensors in and out so that ONNX export can wrap it; padded refs give finite,
      ignored outputs);
    - ``loss(outputs, routed, targets) -> dict of weighted scalar losses``, matched with
      grouped Hungarian matching, zero but graph-connected when there are no targets;
    - ``postprocess(outputs, routed) -> per image, per valid ref, a dict of numpy values``
      in the normalised model frame, each with its "ordinal" and "group".
    """

    unit: ClassVar[str] = ""

    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int],
                 loss_weights: LossWeights | Mapping[str, float] | None = None,
                 match_costs: MatchCosts | Mapping[str, float] | None = None) -> None:
        super().__init__()
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

    def check_targets(self, routed: RoutedRefs, targets: list[UnitTargets], field: str) -> list[Tensor]:
        """One target tensor per image for ``field`` (empty when an image has none of this unit)."""
        if len(targets) != routed.valid.shape[0]:
            raise InputError(f"{self.unit} decoder: {len(targets)} target entries for a batch of "
                             f"{routed.valid.shape[0]} images; pass one UnitTargets per image (count 0 if none)")
        values = []
        for b, target in enumerate(targets):
            value = getattr(target, field)
            if value is None and target.count > 0:
                raise InputError(f"{self.unit} decoder: image {b} has {target.count} {self.unit} targets "
                                 f"but UnitTargets.{field} is None; fill it in the processor")
            values.append(value)
        return values


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


# ---- registry ---------------------------------------------------------------------

_REGISTRY: dict[str, type[UnitDecoder]] = {}
D = TypeVar("D", bound=type[UnitDecoder])


def register_decoder(name: str, *, replace: bool = False) -> Callable[[D], D]:
    """Class decorator: make ``cls`` the decoder of unit ``name``.

    Registering an existing name raises unless ``replace=True`` (how an external decoder
    replaces a built-in one).
    """
    def decorate(cls: D) -> D:
        if not issubclass(cls, UnitDecoder):
            raise ConfigError(f"{cls.__name__} must subclass UnitDecoder to be registered as unit '{name}'")
        if name in _REGISTRY and _REGISTRY[name] is not cls and not replace:
            raise ConfigError(f"unit '{name}' already has decoder {_REGISTRY[name].__name__}; "
                              f"pass replace=True to register_decoder to swap in {cls.__name__}")
        cls.unit = name
        _REGISTRY[name] = cls
        return cls
    return decorate


def unregister_decoder(name: str) -> None:
    """Remove a unit from the registry (plugins and tests that register temporary units)."""
    _REGISTRY.pop(name, None)


def registered_units() -> tuple[str, ...]:
    """Names of all registered units, in registration order."""
    return tuple(_REGISTRY)


def decoder_class(name: str) -> type[UnitDecoder]:
    if name not in _REGISTRY:
        raise ConfigError(f"no decoder registered for unit '{name}': registered units are "
                          f"{list(_REGISTRY)}; register one with @register_decoder('{name}')")
    return _REGISTRY[name]


def build_decoder(name: str, llm_dim: int, pyramid_channels: Sequence[int], **kwargs: Any) -> UnitDecoder:
    """Instantiate the decoder of unit ``name``; kwargs come from ModelConfig.decoders[name]
    (plus ``loss_weights`` and ``match_costs``, e.g. ModelConfig's)."""
    cls = decoder_class(name)
    try:
        return cls(llm_dim, pyramid_channels, **kwargs)
    except TypeError as error:
        raise ConfigError(f"bad settings for the '{name}' decoder ({cls.__name__}): {error}; "
                          f"fix ModelConfig.decoders['{name}']") from error
