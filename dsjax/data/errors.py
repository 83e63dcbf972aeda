"""DataError: a user-fixable problem with data on disk (a path, a file, a prepared dataset, a tokenizer file)."""


class DataError(ValueError):
    """Raised with one sentence that names the culprit (file and line, or the flag that points at it)."""
