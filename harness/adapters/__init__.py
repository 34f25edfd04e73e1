"""Model adapters: one file per supported family, and the allow-list of supported `transformers` classes.

`adapter_for(model)` gives a loaded model's adapter, `adapter_of(spec)` a conf/model entry's (before loading).
"""

from __future__ import annotations

from omegaconf import DictConfig

from harness.adapters.base import ModelAdapter
from harness.adapters.internvl import InternVLAdapter
from harness.adapters.llava import LlavaAdapter
from harness.adapters.llava_next import LlavaNextAdapter
from harness.adapters.llava_onevision import LlavaOnevisionAdapter
from harness.adapters.qwen2_5_vl import Qwen25VLAdapter
from harness.adapters.qwen2_vl import Qwen2VLAdapter
from harness.adapters.qwen3_vl import Qwen3VLAdapter
from methods.base import ConfigError

ADAPTERS: dict[str, ModelAdapter] = {a.family: a for a in (
    LlavaAdapter(), Qwen2VLAdapter(), Qwen25VLAdapter(), Qwen3VLAdapter(), InternVLAdapter(), LlavaNextAdapter(),
    LlavaOnevisionAdapter())}
#: every `transformers` class the runtime supports, with its adapter
SUPPORTED_MODELS: dict[str, ModelAdapter] = {arch: a for a in ADAPTERS.values() for arch in a.architectures}
DEFAULT_FAMILY = "llava"  # conf/model entries written before the adapters had no `family`


def adapter_of(spec: DictConfig) -> ModelAdapter:
    """The adapter of a conf/model entry (`family`, LLaVA-1.5 when absent), or a ConfigError naming the families."""
    family = spec.get("family") or DEFAULT_FAMILY
    if family not in ADAPTERS:
        raise ConfigError(f"unknown model.family {family!r}; valid families: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[family]


def adapter_for(model) -> ModelAdapter:
    """The adapter of a loaded model, or a ConfigError naming the supported classes."""
    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise ConfigError(f"{name} is not supported; supported: {', '.join(SUPPORTED_MODELS)}")
    return SUPPORTED_MODELS[name]


__all__ = ["ADAPTERS", "SUPPORTED_MODELS", "ModelAdapter", "adapter_for", "adapter_of"]
