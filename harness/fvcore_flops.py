"""fvcore's count of a prefill: `flops=fvcore` and `python -m harness.flops ... counter=fvcore`.

fvcore's `FlopCountAnalysis` jit-traces one forward and counts the ops the trace recorded. The prefill is traced as a
plain forward (`use_cache=False`, logits of the last position only, as generate()'s prefill) inside the pruning
runtime, so the trace holds exactly the ops the pruned prefill ran: the runtime's gathers, the method's scoring and
the shorter layers. generate() and its KV cache cannot be traced; decode FLOPs come from the projection.

**Unit.** fvcore counts one multiply-add as one "flop"; everything here is converted to prunebench's unit (FLOPs =
2 × multiply-adds). Only matrix products are counted, as in `harness.flops`: fvcore's handles for linear, conv,
matmul, bmm, einsum, mm and addmm, plus one for `aten::scaled_dot_product_attention` (which fvcore does not count:
the `sdpa_flops` formula of the torch counter). fvcore's norm and pooling handles are switched off.

**Breakdown.** `by_module` of the trace: the vision tower, the projector, lm_head, and per decoder layer its q/k/v/o
projections, its MLP, and attention (the attention module's count less its projections: sdpa, or the explicit
softmax/matmul of eager and edited layers). The method's own work (`harness.runtime.in_method_work`) is traced in a
scope of its own, `method`, so it is counted once, on its own line. The vision-related part of each layer's attention
is its share of vision query-key pairs, from the tokens entering the layer (the runtime's records).

**What fvcore does not see.** The trace keeps only ops whose results are used: the CLIP layers after the one LLaVA
reads (`vision_feature_layer=-2`: the last one) run, but are eliminated from the trace, so fvcore's vision encoder is
short by exactly those layers (`Architecture.unread_vision_layers`) against the torch counter and the projection.
"""

from __future__ import annotations

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import (
    addmm_flop_jit,
    bmm_flop_jit,
    conv_flop_jit,
    einsum_flop_jit,
    get_shape,
    linear_flop_jit,
    matmul_flop_jit,
)
from torch import nn
from torch.overrides import TorchFunctionMode

from harness.flops import LayerFlops, PhaseFlops, sdpa_flops
from harness.runtime import PruningRuntime, in_method_work, prune
from methods.base import TokenPruner

FLOPS_PER_FVCORE_FLOP = 2  # fvcore's "flop" is one multiply-add
METHOD_SCOPE = "method"


def _sdpa_handle(inputs, outputs) -> int:
    """fvcore handle for `aten::scaled_dot_product_attention`, in multiply-adds."""
    query, key, value = (get_shape(value) for value in inputs[:3])
    return sdpa_flops(query, key, value) // FLOPS_PER_FVCORE_FLOP


# fvcore's own handles for matrix products; its default set also counts norms and pooling, which prunebench does not.
MATRIX_PRODUCTS = {"aten::linear": linear_flop_jit, "aten::_convolution": conv_flop_jit,
                   "aten::matmul": matmul_flop_jit, "aten::mm": matmul_flop_jit, "aten::bmm": bmm_flop_jit,
                   "aten::addmm": addmm_flop_jit, "aten::einsum": einsum_flop_jit,
                   "aten::scaled_dot_product_attention": _sdpa_handle}


class _Prefill(nn.Module):
    """generate()'s prefill as a traceable forward: tensors in, the last position's logits out."""

    def __init__(self, model):
        super().__init__()
        self.llava = model
        self.add_module(METHOD_SCOPE, nn.Module())  # never called: the scope the method's own work is traced in

    def forward(self, input_ids, attention_mask, pixel_values=None):
        return self.llava(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                          use_cache=False, logits_to_keep=1).logits


class _MethodScope(TorchFunctionMode):
    """Traces each op of the method's own work in the `method` scope. fvcore attributes an op to the innermost scope
    and that scope's owners, so method work inside a decoder layer (a probe's attention rows) counts under `method`
    only, not under the layer."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        tracing = torch._C._get_tracing_state()
        if tracing is None or not in_method_work():
            return func(*args, **(kwargs or {}))
        tracing.push_scope(METHOD_SCOPE)
        try:
            return func(*args, **(kwargs or {}))
        finally:
            tracing.pop_scope()


def analysis(model, pruner: TokenPruner, inputs: dict, sample_ids: list) -> tuple[FlopCountAnalysis, _Prefill,
                                                                                  PruningRuntime]:
    """fvcore's analysis of the pruned prefill of a batch, traced now (fvcore traces lazily, and the runtime's hooks
    must be installed while it does)."""
    prefill = _Prefill(model)
    traced = FlopCountAnalysis(prefill, tuple(inputs[key] for key in ("input_ids", "attention_mask", "pixel_values")
                                              if key in inputs))
    traced.clear_op_handles().set_op_handle(**MATRIX_PRODUCTS)
    traced.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with torch.no_grad(), prune(model, pruner, sample_ids) as runtime, _MethodScope():
        traced.by_module()
    return traced, prefill, runtime


def prefill_flops(traced: FlopCountAnalysis, prefill: _Prefill, runtime: PruningRuntime) -> PhaseFlops:
    """The prefill of the whole batch in prunebench's breakdown and unit."""
    counts = traced.by_module()
    name = {module: name for name, module in prefill.named_modules()}

    def flops(module: nn.Module) -> float:
        return FLOPS_PER_FVCORE_FLOP * counts[name[module]]

    llava = prefill.llava.model
    layers = []
    for index, layer in enumerate(llava.language_model.layers):
        attention = layer.self_attn
        projections = sum(flops(p) for p in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj))
        core = flops(attention) - projections
        layers.append(LayerFlops(projections=projections, mlp=flops(layer.mlp), attention=core,
                                 vision_attention=core * _vision_pair_share(runtime, index)))
    phase = PhaseFlops(layers, vision=flops(llava.vision_tower), projector=flops(llava.multi_modal_projector),
                       lm_head=flops(prefill.llava.lm_head), method=flops(getattr(prefill, METHOD_SCOPE)))
    phase.other = FLOPS_PER_FVCORE_FLOP * traced.total() - phase.total
    return phase


def _vision_pair_share(runtime: PruningRuntime, index: int) -> float:
    """The share of a prefill layer's query-key pairs (n × n, causal halving aside) with a vision query or key."""
    if not runtime.active:
        return 0.0
    record = runtime.layers[index]
    tokens, vision = record.orig_index.shape[1], int(record.vision_tokens[0])
    return 1 - (tokens - vision) ** 2 / tokens**2


def count_prefill(model, pruner: TokenPruner, inputs: dict, sample_ids: list) -> PhaseFlops:
    """fvcore's count of a batch's pruned prefill, per sample."""
    traced, prefill, runtime = analysis(model, pruner, inputs, sample_ids)
    return prefill_flops(traced, prefill, runtime).scaled(1 / inputs["input_ids"].shape[0])
