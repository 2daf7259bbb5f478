"""Visual-unit decoders, one module per unit, found by name in a registry.

Importing this package registers the built-in units (box, mask, keypoint, depth) and the
external kinds of box and mask (``external``). Add a unit, or a kind of one, with
``@register_decoder("name", kind=...)`` on a UnitDecoder subclass.
"""
from refvlm_core.decoders.base import (DEFAULT_KIND, UnitDecoder, build_decoder, decoder_class,
                                       register_decoder, registered_units, unregister_decoder)
from refvlm_core.decoders.box import BoxDecoder
from refvlm_core.decoders.depth import DepthDecoder
from refvlm_core.decoders.keypoint import KeypointDecoder
from refvlm_core.decoders.mask import MaskDecoder
from refvlm_core.decoders import external, objects  # noqa: F401  (register the external and object kinds)

__all__ = ["DEFAULT_KIND", "UnitDecoder", "build_decoder", "decoder_class", "register_decoder",
           "registered_units", "unregister_decoder", "BoxDecoder", "MaskDecoder", "KeypointDecoder",
           "DepthDecoder"]
