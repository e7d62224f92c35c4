"""Exceptions raised where bad input enters, each naming what was wrong."""


class SplitServeError(Exception):
    """Base class for every error splitserve raises on purpose."""


class ModelLoadError(SplitServeError):
    """The model path, its files or its architecture cannot be used."""


class InvalidRequestError(SplitServeError, ValueError):
    """A prompt or sampling parameter is invalid (an HTTP 400 at the API). `param`: the
    request field at fault, when known (the `param` of the API's error JSON)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class RequestFailed(SplitServeError):
    """A request was accepted but a worker could not finish it (worker died, KV transfer timed
    out, ...). The message says what happened; the request's blocks are freed everywhere."""


class ServiceUnavailable(SplitServeError):
    """No worker (or no complete prefill+decode pair) is there to serve the request."""


class IntegrityError(SplitServeError):
    """An internal invariant is broken (a bug, never bad input): a block's reference count
    disagrees with its holders, a load counter with the requests it counts. Raised rather than
    asserted, so the checks still run under `python -O`; workers count them in /health."""


class StepFailed(SplitServeError):
    """A step's forward pass raised. Its requests (`request_ids`) were aborted where they
    stood, their blocks freed and none of this step's KV cached; the engine goes on with the
    rest. `requests`: the step's (aborted) requests; `finished`: those that ended while the
    step was scheduled (they still need their final output)."""

    def __init__(self, requests: list, finished: list, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.requests = requests
        self.finished = finished

    @property
    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.requests]
