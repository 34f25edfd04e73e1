"""`harness.bench` covers every registered method at each budget (a budget-free one once), says why it skips a
configuration, and computes realisation from the times it measured."""

from __future__ import annotations

import statistics

import pytest
import torch
from transformers import LlavaConfig

from harness import bench
from harness.models import MODEL_CONFIGS
from methods import METHODS

BUDGETS = [16, 64]  # 16: no reference schedule for SparseVLM or VisionZip, which refuse it


@pytest.fixture(scope="module")
def small():
    """The GPU benchmark's code path (the shipped 7B config, random weights) at a tiny size: 64 vision tokens."""
    config = LlavaConfig.from_json_file(MODEL_CONFIGS / "llava-1.5-7b-hf.json")
    config.text_config.update(dict(hidden_size=64, intermediate_size=172, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=4, head_dim=16))
    config.vision_config.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=112))
    model = bench.random_model(config, torch.device("cpu"), torch.float32)
    return model, bench.prompt_inputs(model, text_tokens=45)  # 35 before the image, a 10-token question after it


def test_every_method_and_budget_has_a_row_or_a_reason(small):
    model, inputs = small
    pruners, skipped = bench.configurations(BUDGETS, num_vision=64, num_layers=3, model_config=model.config)
    assert set(pruners).isdisjoint(skipped)
    # Every registered method appears: at each budget if it reads one, once if not, in each of its variants.
    for name in METHODS:
        for options in bench.VARIANTS.get(name, ({},)):
            label = " ".join([name, *(f"{key}={value}" for key, value in options.items())])
            if name == "none":
                assert "none" in pruners
            elif not bench.method_pruner(name, options, BUDGETS[0]).uses_budget:
                assert label in pruners and not any(key.startswith(f"{label} ") for key in {**pruners, **skipped})
            else:
                assert all(f"{label} {budget}" in {**pruners, **skipped} for budget in BUDGETS), label
    assert "budgets 192, 128, 96, 64 only, got 16" in skipped["sparsevlm 16"]
    assert "budget 16 set method.dominant and method.contextual" in skipped["visionzip 16"]
    assert {"fastv 16", "random k=2 16", "random k=0 16", "visipruner attention=eager",
            "visipruner attention=model"} <= set(pruners)

    rows = bench.measure(model, inputs, pruners, repeats=1)
    dense = statistics.median(rows["none"]["times"])
    for name, row in rows.items():
        assert len(row["times"]) == 1 and row["prefill_ms"] == pytest.approx(1e3 * row["times"][0])
        assert row["time_ratio"] == pytest.approx(row["times"][0] / dense)
        saved = 1 - row["flops_ratio"]
        if name != bench.VISION_ONLY and saved > 0:
            assert row["realisation"] == pytest.approx((1 - row["time_ratio"]) / saved)
        else:
            assert row["realisation"] is None
    assert rows["random k=0 16"]["mean_vision_tokens"] == 16 and rows["random k=0 16"]["realisation"] is not None
    assert rows["visipruner attention=eager"]["note"] == bench.FORCES_EAGER
    assert "note" not in rows["visipruner attention=model"] and "note" not in rows["fastv 16"]
    assert rows["fastv 16"]["method_flops"] > 0 and rows["random k=2 16"]["method_flops"] == 0

    table = bench.format_markdown([{"model": "small", "device": "cpu", "rows": rows, "skipped": skipped}])
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(rows) + len(skipped)  # the header, a row per configuration, a row per skipped one
    assert "| skipped: SparseVLM 1.5 has reference schedules" in table


@torch.no_grad()
def test_a_qwen_model_is_benchmarked_on_one_image_of_the_asked_size():
    """`--model tiny_qwen25vl --image-size 112`: one 8x8-patch image (16 vision tokens between the vision markers, no
    marker among the random text), the configurations Qwen refuses skipped with its reason, the others timed."""
    from harness.adapters import adapter_for

    assert {"small", "llava7b", "qwen25vl7b", "qwen3vl8b", "tiny_qwen2vl"} <= set(bench.model_names())
    assert "tiny_next" not in bench.model_names()
    model = bench.build("tiny_qwen25vl", torch.device("cpu"), torch.float32)
    inputs = bench.prompt_inputs(model, text_tokens=45, image_size=112)
    ids, config = inputs["input_ids"][0], model.config
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]] and inputs["pixel_values"].shape == (64, 1176)
    assert [int((ids == token).sum()) for token in (config.image_token_id, config.vision_start_token_id,
                                                    config.vision_end_token_id, config.video_token_id)] == [16, 1, 1, 0]
    assert int(ids[35]) == config.vision_start_token_id and torch.equal(inputs["mm_token_type_ids"][0],
                                                                       (ids == config.image_token_id).long())
    pruners, skipped = bench.configurations([8], 16, 4, config, adapter_for(model))
    assert "whose vision tower is no CLIP" in skipped["cdpruner 8"] and "M-RoPE" in skipped["pdrop 8"]
    rows = bench.measure(model, inputs, {name: pruners[name] for name in ("none", "fastv 8", "random k=0 8")},
                         repeats=1)
    assert [rows[name]["mean_vision_tokens"] for name in ("none", "fastv 8", "random k=0 8")] == [16, 12, 8]
    assert rows["random k=0 8"]["flops_ratio"] < rows["fastv 8"]["flops_ratio"] < 1
