"""rayinfer: serve DeepSeek-V3/R1-architecture MoE models on Ray, the way DeepSeek's production system does.

`from rayinfer import LLM, SamplingParams` is the offline API; everything else lives in submodules.
"""
__version__ = "0.1.0"

from rayinfer.messages import RequestOutput, SamplingParams  # noqa: E402


def __getattr__(name):  # LLM pulls in torch and the engine; import it only when asked for
    if name == "LLM":
        from rayinfer.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput"]
