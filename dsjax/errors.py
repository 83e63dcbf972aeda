"""Errors a user can cause and fix; their messages name the culprit in one sentence."""


class ConfigError(ValueError):
    """A configuration mistake; the message names the config key."""
