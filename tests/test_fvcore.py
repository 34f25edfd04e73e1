"""fvcore's count of a pruned prefill equals the torch counter's and the projection, per decoder layer and component;
where the jit trace cannot see work that ran (the unread CLIP layer), the exact difference."""

from __future__ import annotations

import pytest
import torch

from harness.config import compose, validate
from harness.flops import (
    Architecture,
    FlopCounter,
    PhaseFlops,
    cost_fields,
    executed_schedule,
    format_table,
    parse_args,
    project,
    report,
)
from harness.fvcore_flops import FLOPS_PER_FVCORE_FLOP, analysis, count_prefill, prefill_flops
from harness.lmms import Prunebench
from harness.runtime import prune
from methods import Budget, FastV, TokenPruner, VisionZip, VisiPruner

QUESTION = "What is in the image?"
PRUNERS = {
    "none": TokenPruner,
    "fastv": lambda: FastV(budget=Budget(64)),  # on sdpa: its probe computes attention rows (the method's work)
    # Edited shallow layer 0 (explicit softmax/matmul), a filtering layer, eager attention elsewhere.
    "visipruner": lambda: VisiPruner(layer_threshold=0.9999999, tokens_threshold=0.001, exit_threshold=0.5,
                                     shallow_mid_layer=1),
    "visionzip": lambda: VisionZip(budget=Budget(64)),  # before the language model, with a vision-tower probe
}
PARTS = ("projections", "mlp", "attention", "vision_attention")


def torch_counter_prefill(model, pruner, inputs) -> tuple[PhaseFlops, PhaseFlops]:
    """The torch counter's count of the same prefill, and the projection of what ran."""
    with torch.no_grad(), prune(model, pruner, sample_ids=[0]) as runtime, FlopCounter(model, runtime) as counter:
        model(**inputs, use_cache=False, logits_to_keep=1)
    projected, _ = project(Architecture.from_config(model.config), executed_schedule(runtime, decode_steps=0))
    return counter.prefill, projected


@pytest.mark.parametrize("name", PRUNERS)
def test_fvcore_equals_the_torch_counter_and_the_projection(tiny, images, name):
    inputs = tiny.inputs(images[:1], [QUESTION])
    fvcore = count_prefill(tiny.model, PRUNERS[name](), inputs, sample_ids=[0])
    pruner = PRUNERS[name]()
    counted, projected = torch_counter_prefill(tiny.model, pruner, inputs)
    if name == "visipruner":
        assert pruner.filter_layer is not None and pruner.attention_backend == "eager"

    for fv, c, p in zip(fvcore.layers, counted.layers, projected.layers, strict=True):
        for part in PARTS:
            assert getattr(fv, part) == pytest.approx(getattr(c, part), rel=1e-12) == getattr(p, part), part
    assert fvcore.lm_head == counted.lm_head == projected.lm_head
    assert fvcore.other == counted.other == 0
    # The method's own work: counted by both counters alike (FastV's probe rows on sdpa, VisionZip's CLS attention
    # and merging), never projected.
    assert fvcore.method == counted.method and projected.method == 0
    assert (fvcore.method > 0) == (name in ("fastv", "visionzip"))

    arch = Architecture.from_config(tiny.model.config)
    # The trace eliminates the CLIP layers after the one LLaVA reads (-2: the last one): they run, unread.
    assert arch.unread_vision_layers == 1
    assert fvcore.vision == counted.vision - arch.vision_layer() == projected.vision - arch.vision_layer()
    # The projection feeds all 576 features to the projector; VisionZip feeds it its 64, as both counters see.
    assert fvcore.projector == counted.projector == arch.projector(64 if name == "visionzip" else 576)
    assert projected.projector == arch.projector(576)
    assert fvcore.total == pytest.approx(counted.total - arch.vision_layer(), rel=1e-12)


def test_fvcore_unit_and_scopes(tiny, images):
    """fvcore's own numbers are multiply-adds: the breakdown is twice them, and the method's scope holds FastV's probe
    rows (one query over every key per head) and nothing of the layer it ran in."""
    inputs = tiny.inputs(images[:1], [QUESTION])
    traced, prefill, runtime = analysis(tiny.model, FastV(budget=Budget(64)), inputs, sample_ids=[0])
    flops = prefill_flops(traced, prefill, runtime)
    assert flops.total == FLOPS_PER_FVCORE_FLOP * traced.total()
    text = tiny.model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert traced.by_module()["method"] == text.num_attention_heads * inputs["input_ids"].shape[1] * head_dim
    assert set(traced.by_operator("method")) == {"matmul"}


@torch.no_grad()
def test_a_run_with_flops_fvcore_records_fvcore_prefill_and_projected_decode(tmp_path, tiny, images):
    records = {}
    for source in ("fvcore", "projected"):
        cfg = compose([f"output_dir={tmp_path}", "model=tiny", "model.num_layers=4", "method=fastv", "budget=64",
                       f"flops={source}"])
        model = Prunebench.for_run(cfg, validate(cfg), {}, None)
        model.loaded = tiny
        (records[source],) = model._generate([(0, "t/0", QUESTION, {"max_new_tokens": 3}, [images[0]], {})])
    fvcore, projected = records["fvcore"]["flops"], records["projected"]["flops"]
    assert fvcore["decode"] == projected["decode"] and fvcore["decode"]["total"] > 0
    arch = Architecture.from_config(tiny.model.config)
    method = fvcore["prefill"]["method"]
    assert method > 0 and projected["prefill"]["method"] == 0
    assert fvcore["prefill"]["total"] == pytest.approx(projected["prefill"]["total"] - arch.vision_layer() + method,
                                                       rel=1e-12)
    cost = cost_fields([records["fvcore"]], "fvcore")
    assert cost["flops_source"] == "fvcore prefill, projected decode" and cost["flops_method"] == method


def test_flops_command_prints_fvcore_beside_the_torch_counter():
    result = report(*parse_args(["model=tiny", "model.num_layers=4", "method=fastv", "budget=64", "counter=fvcore"]))
    fvcore, counted = result["counted"]["fvcore"], result["counted"]["torch"]
    unread = result["counted"]["unread_vision_layers_flops"]
    assert unread > 0 and fvcore["vision"] == counted["vision"] - unread
    assert fvcore["language_model"] == counted["language_model"] == result["pruned"]["prefill"]["language_model"]
    assert "llava.model.language_model.layers.3" in result["counted"]["fvcore_table"]
    assert "fvcore's own table" in format_table(result)
