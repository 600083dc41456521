"""Which class runs which config.json `model_type`."""
from __future__ import annotations

from torch import nn

_ARCHITECTURES = {
    "llama": ("distserve.models.llama", "LlamaForCausalLM"),
    "mistral": ("distserve.models.llama", "LlamaForCausalLM"),
    "qwen2": ("distserve.models.llama", "LlamaForCausalLM"),
    "opt": ("distserve.models.opt", "OPTForCausalLM"),
}


def supported_model_types() -> list[str]:
    return sorted(_ARCHITECTURES)


def model_class(model_type: str) -> type[nn.Module]:
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(supported_model_types())}")
    module_name, class_name = _ARCHITECTURES[model_type]
    import importlib
    return getattr(importlib.import_module(module_name), class_name)
