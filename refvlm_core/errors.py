"""Errors a user can act on. The CLI prints them without a traceback; the ROS node
returns them in service replies. Each message says what was wrong and what to do."""


class RefVLMError(Exception):
    """Base class of every error the project raises on purpose."""


class InputError(RefVLMError, ValueError):
    """Bad user input: image, prompt, visual prompt, file contents."""


class ConfigError(RefVLMError, ValueError):
    """An invalid configuration value or a missing file named in a config."""


class TrpSyntaxError(RefVLMError, ValueError):
    """Model text that is not valid TRP (raised only by the strict parser)."""


class CheckpointError(RefVLMError):
    """A missing, corrupt or mismatched checkpoint, ONNX file or engine."""
