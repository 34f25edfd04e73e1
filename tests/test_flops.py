"""FLOPs accounting: the counter equals the projection on executed tiny models and on the 7B config on `meta`;
vision-related attention; KV-cache bytes; `python -m harness.flops`."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from harness import bench
from harness.cost import ForwardTimer, kv_cache_bytes, returned_cache
from harness.flops import (
    COMPONENTS,
    Architecture,
    FlopCounter,
    PhaseFlops,
    Schedule,
    count_generation,
    executed_schedule,
    parse_args,
    project,
    report,
)
from harness.models import MODEL_CONFIGS
from harness.runtime import prune
from methods import METHODS, Budget, ConfigError, RandomPruner, ScorerPruner, Selection, TokenPruner, VisiPruner
from tests.conftest import tiny_model

NEW_TOKENS = 4
QUESTIONS = ["What is in the image?", "Describe the colours and the shapes you can see in this picture, please."]


class DropAllVision(TokenPruner):
    def select(self, layer, state):
        return Selection(keep=state.vision_index[:, :0]) if layer == 1 else None


def counted_and_projected(loaded, pruner, images, questions) -> tuple[tuple[PhaseFlops, PhaseFlops], ...]:
    """Generate under the counter; return its per-sample (prefill, decode) and the projection of what ran."""
    inputs = loaded.inputs(images, questions)
    rows = len(questions)
    with torch.no_grad(), prune(loaded.model, pruner, sample_ids=list(range(rows))) as runtime, \
            ForwardTimer(loaded.model) as timer, FlopCounter(loaded.model, runtime) as counter:
        loaded.model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert timer.decode_steps == NEW_TOKENS - 1
    projected = project(Architecture.from_config(loaded.model.config), executed_schedule(runtime, timer.decode_steps))
    return (counter.prefill.scaled(1 / rows), counter.decode.scaled(1 / rows)), projected


def assert_equal_flops(counted: PhaseFlops, projected: PhaseFlops, skip: tuple[str, ...] = ("method",)) -> None:
    for a, b in zip(counted.layers, projected.layers, strict=True):
        for part in ("projections", "mlp", "attention", "vision_attention"):
            if part not in skip:
                assert getattr(a, part) == pytest.approx(getattr(b, part), rel=1e-9), part
    counted_parts, projected_parts = counted.summary(), projected.summary()
    for key in COMPONENTS:
        if key not in skip and key != "total":
            assert counted_parts[key] == pytest.approx(projected_parts[key], rel=1e-9), key
    # The total holds what is counted only (the method's work): within 0.5% all the same.
    assert counted.total == pytest.approx(projected.total, rel=5e-3)


SCORERS = sorted(name for name, cls in METHODS.items() if issubclass(cls, ScorerPruner))


@pytest.mark.parametrize(("name", "k", "batch"), [("none", None, 2), *((s, 0, 2) for s in SCORERS),
                                                  *((s, 2, 2) for s in SCORERS)])
def test_counter_equals_projection_per_layer(tiny, images, name, k, batch):
    """Dense, and every budgeted single-drop method (random, FastV) at k=0 and k=2, on a padded batch of two."""
    pruner = TokenPruner() if name == "none" else METHODS[name](k=k, budget=Budget(64))
    try:
        pruner.validate(num_vision=576, num_layers=4)
    except ConfigError as error:
        pytest.skip(str(error))  # e.g. FastV cannot prune at layer 0
    (prefill, decode), (projected_prefill, projected_decode) = counted_and_projected(
        tiny, pruner, images[:batch], QUESTIONS[:batch])
    assert_equal_flops(prefill, projected_prefill)
    assert_equal_flops(decode, projected_decode)
    assert prefill.vision > 0 and prefill.projector > 0 and decode.vision == 0


def test_counter_equals_projection_with_eager_attention(images):
    loaded = tiny_model(attn_implementation="eager")
    (prefill, decode), (projected_prefill, projected_decode) = counted_and_projected(
        loaded, RandomPruner(k=1, budget=Budget(100)), images[:1], QUESTIONS[:1])
    assert_equal_flops(prefill, projected_prefill)
    assert_equal_flops(decode, projected_decode)


def test_visipruner_method_work_is_counted_on_its_own_line(tiny, images):
    """Probes, explicitly computed edited layers and a layer-0 cache eviction (paper variant). On the model's sdpa
    the probes compute attention rows (method work); on eager, VisiPruner's default, they read the layer's own."""
    for attention, method_flops in (("model", True), ("eager", False)):
        pruner = VisiPruner(layer_threshold=0.9999999, tokens_threshold=0.001, exit_threshold=0.5,
                            shallow_mid_layer=1, variant="paper", attention=attention)
        (prefill, decode), (projected_prefill, projected_decode) = counted_and_projected(
            tiny, pruner, images[:1], QUESTIONS[:1])
        assert pruner.filter_layer is not None, "the thresholds must reach the middle stage"
        assert_equal_flops(prefill, projected_prefill)
        assert_equal_flops(decode, projected_decode)
        assert (prefill.method > 0) == method_flops and projected_prefill.method == 0 and decode.method == 0


def test_vision_attention_is_zero_after_all_vision_tokens_are_dropped(tiny, images):
    (prefill, decode), (projected_prefill, projected_decode) = counted_and_projected(
        tiny, DropAllVision(), images[:1], QUESTIONS[:1])
    assert prefill.layers[0].vision_attention > 0 and decode.layers[0].vision_attention > 0
    for phase in (prefill, decode, projected_prefill, projected_decode):
        assert all(layer.vision_attention == 0 for layer in phase.layers[1:])
        assert all(layer.attention > 0 for layer in phase.layers)


def test_kv_cache_bytes_equal_the_cached_tensors(tiny, images):
    inputs = tiny.inputs(images[:1], QUESTIONS[:1])
    n = inputs["input_ids"].shape[1]
    with torch.no_grad(), prune(tiny.model, RandomPruner(k=2, budget=Budget(64)), sample_ids=[0]) as runtime, \
            ForwardTimer(tiny.model) as timer:
        cache = returned_cache(tiny.model(**inputs, use_cache=True))
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert [layer.keys.shape[2] for layer in cache.layers] == [n, n, n - 512, n - 512]
    assert kv_cache_bytes(cache) == held == timer.kv_bytes
    arch = Architecture.from_config(tiny.model.config)
    assert arch.kv_cache_bytes(executed_schedule(runtime, 0).cache, element_size=4) == held


@pytest.mark.parametrize("call", ["generate", "forward"])
def test_prefill_time_includes_the_vision_tower(tiny, images, call):
    """generate() of transformers 5 encodes the image before its first forward; a plain forward encodes it inside.
    Either way the prefill time covers the vision tower (slowed down here by a known delay), and no decode step does."""
    delay = 0.5
    inputs = tiny.inputs(images[:1], QUESTIONS[:1])
    handle = tiny.model.model.vision_tower.register_forward_hook(lambda *_: time.sleep(delay))
    try:
        with torch.no_grad(), ForwardTimer(tiny.model) as timer:
            if call == "generate":
                tiny.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            else:
                tiny.model(**inputs, use_cache=True)
    finally:
        handle.remove()
    assert timer.prefill_seconds >= delay
    assert timer.decode_steps == (2 if call == "generate" else 0)
    assert timer.decode_seconds < delay


def test_meta_7b_count_equals_projection():
    """The whole LLaVA-1.5-7B forward (every position through lm_head) counted on `meta`, env.md §4c's numbers."""
    config = LlavaConfig.from_json_file(MODEL_CONFIGS / "llava-1.5-7b-hf.json")
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config).eval()
    n, text = 636, 60
    with torch.no_grad(), FlopCounter(model) as counter:
        model.model.get_image_features(pixel_values=torch.empty(1, 3, 336, 336, device="meta"))
        hidden = model.model.language_model(inputs_embeds=torch.empty(1, n, 4096, device="meta"),
                                            use_cache=True).last_hidden_state
        model.lm_head(hidden)
    arch = Architecture.from_config(config)
    projected, _ = project(arch, Schedule([n] * 32, [n - text] * 32, logits=n))
    # Without a pruning runtime the counter does not split vision-related attention.
    assert_equal_flops(counter.prefill, projected, skip=("method", "vision_attention"))
    assert counter.prefill.language_model == pytest.approx(8.4496e12, rel=1e-4)
    assert counter.prefill.total == pytest.approx(9.0227e12, rel=1e-4)


def test_flops_command_reports_the_papers_dense_7b_number_and_the_prompt():
    done = subprocess.run([sys.executable, "-m", "harness.flops", "model=llava7b", "method=none", "output=json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["paper_convention"]["vision_token_flops"]["dense"] == pytest.approx(3.82e12, abs=0.005e12)
    n, d, m = result["prompt"]["total"], 4096, 11008
    assert n == 576 + result["prompt"]["text_tokens"]
    assert result["dense"]["prefill"]["language_model"] == 32 * (2 * n * (4 * d * d + 3 * d * m) + 4 * n * n * d)


def test_flops_projection_of_a_fixed_schedule_and_of_recorded_counts(tmp_path):
    fixed = report(*parse_args(["model=llava7b", "method=random", "method.k=2", "budget=128", "text_tokens=74"]))
    assert fixed["pruned"]["vision_tokens_per_layer"] == [576, 576] + [128] * 30
    assert fixed["prompt"]["total"] == 650
    d, m = 4096, 11008
    expected = 2 * (4 * 576 * d * d + 2 * 576**2 * d + 3 * 576 * d * m) + 30 * (4 * 128 * d * d + 2 * 128**2 * d
                                                                                + 3 * 128 * d * m)
    assert fixed["paper_convention"]["vision_token_flops"]["pruned"] == expected
    assert fixed["ratio"]["prefill"]["vision"] == 1.0 and fixed["ratio"]["prefill"]["language_model"] < 0.4

    with pytest.raises(ValueError, match="results_dir"):
        report(*parse_args(["model=llava7b", "method=visipruner"]))
    samples = [[576] * 8 + [10] * 16 + [0] * 8, [576] * 32]
    (tmp_path / "samples.jsonl").write_text(
        "".join(json.dumps({"id": i, "pruned": True, "vision_tokens_per_layer": v}) + "\n"
                for i, v in enumerate(samples)))
    recorded = report(*parse_args(["model=llava7b", "method=visipruner", f"results_dir={tmp_path}"]))
    assert recorded["pruned"]["vision_tokens_per_layer"] == [576] * 8 + [293] * 16 + [288] * 8
    arch = Architecture.from_config(LlavaConfig.from_json_file(MODEL_CONFIGS / "llava-1.5-7b-hf.json"))
    per_sample = [project(arch, Schedule([60 + n for n in v], v))[0].total for v in samples]
    assert recorded["pruned"]["prefill"]["total"] == pytest.approx(sum(per_sample) / 2, rel=1e-12)


def test_bench_measures_ratios_on_a_random_model_from_the_shipped_config():
    """The GPU benchmark's code path (shipped config, random weights) at a tiny size on CPU."""
    config = LlavaConfig.from_json_file(MODEL_CONFIGS / "llava-1.5-7b-hf.json")
    config.text_config.update(dict(hidden_size=64, intermediate_size=172, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=4, head_dim=16))
    config.vision_config.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    model = bench.random_model(config, torch.device("cpu"), torch.float32)
    inputs = bench.prompt_inputs(model, text_tokens=60)
    assert inputs["input_ids"].shape == (1, 636) and (inputs["input_ids"] == config.image_token_id).sum() == 576
    pruners = {"none": TokenPruner(), "random": RandomPruner(k=1, budget=Budget(64))}
    rows = bench.measure(model, inputs, pruners, repeats=1)
    dense, pruned = rows["none"], rows["random"]
    assert dense["flops_ratio"] == 1 and dense["realisation"] is None
    assert pruned["mean_vision_tokens"] == (576 + 2 * 64) / 3 and 0 < pruned["flops_ratio"] < 1
    assert pruned["realisation"] == pytest.approx((1 - pruned["time_ratio"]) / (1 - pruned["flops_ratio"]))
    assert len(pruned["times"]) == 1 and pruned["kv_cache_bytes"] < dense["kv_cache_bytes"]
    unpruned = rows[bench.VISION_ONLY]
    arch = Architecture.from_config(config)
    assert unpruned["flops"] == arch.vision_encoder() + arch.projector(576) and unpruned["realisation"] is None


def test_a_runs_counted_replay_equals_its_projection(tiny, images):
    """`flops=counted` replays the timed generation under the counter: the same FLOPs as the projection."""
    inputs = tiny.inputs(images[:1], QUESTIONS[:1])
    pruner = RandomPruner(k=2, budget=Budget(64))
    with torch.no_grad(), prune(tiny.model, pruner, sample_ids=["s"]) as runtime, ForwardTimer(tiny.model) as timer:
        tiny.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    projected = project(Architecture.from_config(tiny.model.config), executed_schedule(runtime, timer.decode_steps))
    counted = count_generation(tiny.model, pruner, inputs, ["s"], max_new_tokens=NEW_TOKENS, do_sample=False)
    for phase_counted, phase_projected in zip(counted, projected, strict=True):
        assert_equal_flops(phase_counted, phase_projected)
    assert projected[1].lm_head == 2 * timer.decode_steps * 64 * tiny.model.config.text_config.vocab_size
