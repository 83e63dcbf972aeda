"""Errors a user can cause and fix; their messages name the culprit in one sentence.

Every layer raises these (the CLIs catch them and print the sentence, exit code 2); nothing else needs importing
to handle a user's mistake. The kernels keep their own `UnsupportedError`, re-raised as a ConfigError by the model.
"""


class ConfigError(ValueError):
    """A configuration mistake; the message names the config key."""


class DataError(ValueError):
    """A problem with data on disk (a path, a file, a prepared dataset, a tokenizer file); names file and line, or
    the flag that points at it."""


class CheckpointNotFound(FileNotFoundError):
    """The given path holds no complete dsjax checkpoint."""


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be used (corrupt, of another model, refused); names the path."""
