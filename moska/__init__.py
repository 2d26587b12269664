"""moska: an inference engine for many requests that share long context."""

from moska.engine.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # LLM pulls in torch and the model; import it lazily so `moska --version` stays fast.
    if name == "LLM":
        from moska.engine.llm import LLM

        return LLM
    raise AttributeError(name)
