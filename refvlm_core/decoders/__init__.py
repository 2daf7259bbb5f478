"""Visual-unit decoders, one module per unit, found by name in a registry.

Importing this package registers the built-in units: box, mask, keypoint, depth.
Add a unit (or replace one) with ``@register_decoder("name")`` on a UnitDecoder subclass.
"""
from refvlm_core.decoders.base import (UnitDecoder, build_decoder, decoder_class, register_decoder,
                                       registered_units, unregister_decoder)
from refvlm_core.decoders.box import BoxDecoder
from refvlm_core.decoders.depth import DepthDecoder
from refvlm_core.decoders.keypoint import KeypointDecoder
from refvlm_core.decoders.mask import MaskDecoder

__all__ = ["UnitDecoder", "build_decoder", "decoder_class", "register_decoder", "registered_units",
           "unregister_decoder", "BoxDecoder", "MaskDecoder", "KeypointDecoder", "DepthDecoder"]
