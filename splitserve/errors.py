"""Exceptions raised where bad input enters, each naming what was wrong."""


class SplitServeError(Exception):
    """Base class for every error splitserve raises on purpose."""


class ModelLoadError(SplitServeError):
    """The model path, its files or its architecture cannot be used."""


class InvalidRequestError(SplitServeError, ValueError):
    """A prompt or sampling parameter is invalid (an HTTP 400 at the API)."""


class RequestFailed(SplitServeError):
    """A request was accepted but a worker could not finish it (worker died, KV transfer timed
    out, ...). The message says what happened; the request's blocks are freed everywhere."""


class ServiceUnavailable(SplitServeError):
    """No worker (or no complete prefill+decode pair) is there to serve the request."""
