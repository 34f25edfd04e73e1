"""Measured costs: prefill and decode time, KV-cache bytes held after prefill, peak memory."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch

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
    """Times each forward of `model` inside the block: the first on an empty cache is the prefill, the rest decode
    steps. On GPU the device is synchronised around each forward so the times are the device's."""

    model: torch.nn.Module
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    kv_bytes: int = 0

    def __enter__(self) -> ForwardTimer:
        self._handles = [self.model.register_forward_pre_hook(self._start, with_kwargs=True),
                         self.model.register_forward_hook(self._stop)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _start(self, module, args, kwargs) -> None:
        self._prefill = not decoding(kwargs)
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        self._sync()
        elapsed = time.perf_counter() - self._t0
        if self._prefill:
            self.prefill_seconds = elapsed
            if (cache := returned_cache(output)) is not None:
                self.kv_bytes = kv_cache_bytes(cache)
        else:
            self.decode_seconds += elapsed
            self.decode_steps += 1
