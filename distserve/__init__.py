"""distserve: LLM serving with prefill and decoding disaggregated, and a goodput planner."""
from distserve.request import SamplingParams


def __getattr__(name):  # the LLM class pulls in torch; import it only when asked for
    if name == "LLM":
        from distserve.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams"]
