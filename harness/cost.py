"""Measured costs: prefill and decode time, KV-cache bytes held after prefill, peak memory."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch

from harness.adapters import adapter_for

CACHE_NAMES = ("cache", "past_key_values")  # transformers 5.24 renamed past_key_values to cache: read both


def forward_cache(kwargs: dict):
    """The KV cache a model or decoder-layer forward was called with, or None."""
    return next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)


def returned_cache(output):
    """The KV cache a model forward returned, or None."""
    return next((value for name in CACHE_NAMES if (value := getattr(output, name, None)) is not None), None)


def decoding(kwargs: dict, layer: int = 0) -> bool:
    """Whether a model or decoder-layer forward continues a cache whose `layer` already holds tokens (a decode step,
    not a prefill)."""
    cache = forward_cache(kwargs)
    return cache is not None and cache.get_seq_length(layer) > 0


def kv_cache_bytes(cache) -> int:
    """Bytes of every key and value tensor the cache holds (layers may differ in length)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


def peak_memory_bytes(device: torch.device) -> int:
    """GPU: the allocator's peak since the last reset; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


@dataclass
class ForwardTimer:
    """Times each forward of `model` (any supported model) inside the block: the first on an empty cache is the
    prefill, the rest decode steps. The prefill runs from the start of the vision tower to the first token's logits,
    also when generate() encodes the image before that forward (transformers 5 does). On GPU the device is
    synchronised around each timed span so the times are the device's."""

    model: torch.nn.Module
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    kv_bytes: int = 0

    def __enter__(self) -> ForwardTimer:
        self._encoding_t0: float | None = None  # the vision tower started before any forward of the model
        self._in_forward = False
        self._handles = [self.model.register_forward_pre_hook(self._start, with_kwargs=True),
                         self.model.register_forward_hook(self._stop),
                         adapter_for(self.model).vision_tower(self.model).register_forward_pre_hook(
                             self._start_encoding)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _start_encoding(self, module, args) -> None:
        if not self._in_forward:  # inside a forward the vision tower is already timed with it
            self._sync()
            self._encoding_t0 = time.perf_counter()

    def _start(self, module, args, kwargs) -> None:
        self._prefill, self._in_forward = not decoding(kwargs), True
        self._sync()
        self._t0 = time.perf_counter()
        if self._prefill and self._encoding_t0 is not None:
            self._t0 = self._encoding_t0
        self._encoding_t0 = None

    def _stop(self, module, args, output) -> None:
        self._sync()
        self._in_forward = False
        elapsed = time.perf_counter() - self._t0
        if self._prefill:
            self.prefill_seconds = elapsed
            if (cache := returned_cache(output)) is not None:
                self.kv_bytes = kv_cache_bytes(cache)
        else:
            self.decode_seconds += elapsed
            self.decode_steps += 1
