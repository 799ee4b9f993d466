"""msrnn's exceptions: every bad input ends in one of these, with a message that names the problem and the fix."""


class MsrnnError(Exception):
    """Base class of every error msrnn raises on purpose."""


class ConfigError(MsrnnError, ValueError):
    """A checkpoint's config.json (or GGUF metadata) describes something msrnn cannot build."""


class CheckpointError(MsrnnError, ValueError):
    """Weights are missing, unexpected, the wrong shape, or stored in a format msrnn refuses (pickle)."""


class InputError(MsrnnError, ValueError):
    """A call got bad arguments: token ids out of range, a state of the wrong batch size, a bad policy budget..."""
