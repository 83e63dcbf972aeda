"""The one error the kernels raise for a request they cannot serve (wrong platform, shape or dtype)."""


class UnsupportedError(ValueError):
    """This kernel cannot run the requested attention here; the message says why and what to use instead.

    `dsjax.model.attention_ops` re-raises it as a ConfigError naming model.attention.
    """
