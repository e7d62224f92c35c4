"""Exceptions raised where bad input enters, each naming what was wrong."""


class SplitServeError(Exception):
    """Base class for every error splitserve raises on purpose."""


class ModelLoadError(SplitServeError):
    """The model path, its files or its architecture cannot be used."""


class InvalidRequestError(SplitServeError, ValueError):
    """A prompt or sampling parameter is invalid (an HTTP 400 at the API)."""
