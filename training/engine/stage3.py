"""Stage 3: an external decoder (refvlm_core.decoders.external: SAM-like mask,
Grounding-DINO-like box) replaces the model's decoder of its unit, then training goes on
as in stage 2. The kind goes into the model config, so the saved model loads, predicts
and exports with it like any other.
"""
from __future__ import annotations

from refvlm_core.decoders import UnitDecoder, build_decoder
from refvlm_core.errors import ConfigError

from refvlm_training.engine.config import ExternalDecoderConfig


def swap_decoder(model, spec: ExternalDecoderConfig) -> UnitDecoder:
    """Replace ``model.decoders[spec.unit]`` by a fresh decoder of ``spec.kind``."""
    if spec.unit not in model.decoders:
        raise ConfigError(f"the model has no '{spec.unit}' decoder to replace; its units are {list(model.decoders)}")
    settings = {"kind": spec.kind, **spec.settings}
    decoder = build_decoder(spec.unit, model.llm.hidden_size, model.encoder.pyramid_channels,
                            loss_weights=model.loss_weights, match_costs=model.config.match_costs,
                            weights=spec.weights, **settings)
    model.decoders[spec.unit] = decoder.to(next(model.parameters()).device)
    model.config.decoders[spec.unit] = settings  # weights travel in the model file, not as a path
    return decoder
