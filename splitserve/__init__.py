"""splitserve: disaggregated prefill/decode LLM serving."""

from splitserve.errors import InvalidRequestError, ModelLoadError, SplitServeError
from splitserve.request import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "SplitServeError", "InvalidRequestError", "ModelLoadError"]


def __getattr__(name):  # keep `import splitserve` light: torch loads only when LLM is used
    if name == "LLM":
        from splitserve.llm import LLM

        return LLM
    raise AttributeError(name)
