"""Staged training of REF-VLM on torch.distributed (DDP or FSDP2), launched alone or by torchrun.

``refvlm train --stage 1|2|3 --config FILE`` or
``torchrun --nproc_per_node N -m refvlm_training.engine --stage ... --config FILE``.
Heavy modules (trainer, stage3) are imported by the functions that need them.
"""
from refvlm_training.engine.config import TrainConfig, config_from_dict, load_config

__all__ = ["TrainConfig", "config_from_dict", "load_config"]
