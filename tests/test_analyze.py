"""The insight tools against direct computations on the tiny model (4 layers, 4 query heads on 2 key/value heads)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness import analyze
from harness.analyze import Request
from harness.tasks import synthetic_samples
from methods import Budget, FastV
from tests.conftest import noise_images, tiny_model, tiny_of

QUESTION = "What color is the square?"
LAYERS = [1, 3]
TOPK = 5


@pytest.fixture(scope="module")
def models():
    """The same weights twice, sdpa (analysed through the runtime's probes) and eager (the reference). The final norm
    gets non-unit weights: with the initial ones RMSNorm is idempotent and a double norm would go unnoticed."""
    sdpa, eager = tiny_model(), tiny_model(attn_implementation="eager")
    with torch.no_grad():
        norm = sdpa.model.model.language_model.norm.weight
        norm.copy_(torch.rand(norm.shape, generator=torch.Generator().manual_seed(0)) + 0.5)
    eager.model.load_state_dict(sdpa.model.state_dict())
    return sdpa, eager


@pytest.fixture(scope="module")
def insight(models, images):
    sdpa, _ = models
    request = Request(images[0], QUESTION, source="test", name="test", layers=LAYERS, topk=TOPK)
    return analyze.analyze(sdpa, request, FastV(k=2, budget=Budget(64)))


@pytest.fixture(scope="module")
def reference(models, images):
    """The eager model's own forward: logits, attentions, hidden states, and each layer's output via hooks."""
    _, eager = models
    inputs = eager.inputs(images[:1], [QUESTION])
    layers = eager.model.model.language_model.layers
    outputs = {}
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out[0, -1]))
               for i, layer in enumerate(layers)]
    with torch.no_grad():
        forward = eager.model(**inputs, output_attentions=True, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    vision = (inputs["input_ids"][0] == eager.model.config.image_token_id).nonzero()[:, 0]
    return forward, outputs, vision


def test_logit_lens_of_the_last_layer_is_the_models_next_token_top_k(insight, reference):
    forward, _, _ = reference
    expected = forward.logits[0, -1].softmax(-1).topk(TOPK)
    assert insight.lens_ids[-1].tolist() == expected.indices.tolist()
    assert torch.allclose(insight.lens_probs[-1], expected.values, atol=1e-6)


def test_logit_lens_applies_the_final_norm_once_to_each_layers_output(models, insight, reference):
    _, eager = models
    _, outputs, _ = reference
    norm, lm_head = eager.model.model.language_model.norm, eager.model.lm_head
    for layer in range(len(outputs) - 1):  # the last layer: the test above
        with torch.no_grad():
            expected = lm_head(norm(outputs[layer])).softmax(-1).topk(TOPK)
        assert insight.lens_ids[layer].tolist() == expected.indices.tolist(), layer
        assert torch.allclose(insight.lens_probs[layer], expected.values, atol=1e-6), layer


def test_attention_mass_on_vision_is_a_fraction_and_equals_eager_attention(insight, reference):
    forward, _, vision = reference
    eager_rows = torch.stack([a[0, :, -1, vision].mean(0) for a in forward.attentions])  # (L, V)
    mass = insight.vision_attention_mass
    assert bool(((mass > 0) & (mass < 1)).all())
    assert (mass - eager_rows.sum(-1)).abs().max() <= 1e-5
    assert (insight.vision_attention - eager_rows).abs().max() <= 1e-6


def test_value_l1_norms_equal_v_proj_of_the_normed_layer_input(models, insight, reference):
    _, eager = models
    forward, _, vision = reference
    config = eager.model.config.text_config
    for layer, block in enumerate(eager.model.model.language_model.layers):
        with torch.no_grad():
            values = block.self_attn.v_proj(block.input_layernorm(forward.hidden_states[layer]))[0, vision]
        expected = values.view(len(vision), config.num_key_value_heads, -1).abs().sum(-1).sum(-1)  # 2 kv heads
        assert torch.allclose(insight.value_norms[layer], expected, rtol=1e-5), layer


def test_value_output_projects_the_last_prompt_tokens_own_value_per_head(models, insight, reference):
    _, eager = models
    forward, _, _ = reference
    language_model = eager.model.model.language_model
    heads, kv_heads = eager.model.config.text_config.num_attention_heads, 2
    for row, layer in enumerate(LAYERS):
        block = language_model.layers[layer]
        with torch.no_grad():
            value = block.self_attn.v_proj(block.input_layernorm(forward.hidden_states[layer]))[0, -1]
            value = value.view(kv_heads, -1)
            dim = value.shape[-1]
            for head in range(heads):
                slice_ = block.self_attn.o_proj.weight[:, head * dim:(head + 1) * dim]
                logits = eager.model.lm_head(language_model.norm(slice_ @ value[head // (heads // kv_heads)]))
                expected = logits.softmax(-1).topk(TOPK)
                assert insight.value_ids[row, head].tolist() == expected.indices.tolist(), (layer, head)
                assert torch.allclose(insight.value_probs[row, head], expected.values, atol=1e-6)


def test_cosine_drop_is_measured_on_the_layers_real_attention_output(models, images, insight, reference):
    """O is what o_proj receives at the last token; c_j from eager attention and v_proj values (float64 arithmetic:
    the drops are ~1e-6 on this model, at float32's resolution)."""
    _, eager = models
    forward, _, vision = reference
    received = {}
    blocks = eager.model.model.language_model.layers
    handles = [b.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: received.__setitem__(i, a[0][0, -1]))
               for i, b in enumerate(blocks)]
    with torch.no_grad():
        eager.model(**eager.inputs(images[:1], [QUESTION]))
    for handle in handles:
        handle.remove()
    heads = eager.model.config.text_config.num_attention_heads
    for layer, block in enumerate(blocks):
        with torch.no_grad():
            values = block.self_attn.v_proj(block.input_layernorm(forward.hidden_states[layer]))[0, vision].double()
        values = values.view(len(vision), 2, 1, -1).expand(-1, -1, heads // 2, -1).reshape(len(vision), heads, -1)
        weights = forward.attentions[layer][0, :, -1, vision].T.double()  # (V, H)
        contributions = (weights[..., None] * values).flatten(1)
        output = received[layer].double()
        drop = 1 - F.cosine_similarity(output[None] - contributions, output[None], dim=-1)
        assert 1e-8 < float(drop.max()) < 1e-3, layer  # spread-out attention: no single token matters much
        assert abs(float(insight.cosine_drop[layer]) / float(drop.max()) - 1) <= 1e-5, layer
        assert int(insight.drop_token[layer]) == int(drop.argmax()), layer


def test_sinks_are_high_attention_low_norm_tokens():
    attention = torch.linspace(0.1, 1.0, 200)[None]  # tokens 198 and 199 lie above the 99th percentile
    norms = torch.full((1, 200), 5.0)
    norms[0, :100] = 1.0
    norms[0, 199] = 0.5  # the most attended token carries almost nothing: a sink; 198 carries a large value
    assert [s.tolist() for s in analyze.find_sinks(attention, norms)] == [[199]]


def test_pruning_records_fastv_keeping_the_patches_most_attended_in_the_layer_before(insight):
    assert insight.vision_tokens == [576, 576, 64, 64]
    assert list(insight.kept_patches) == [2]
    expected = insight.vision_attention[1].topk(64).indices.sort().values  # FastV's score: layer 1's last-token row
    assert insight.kept_patches[2] == expected.tolist()


def test_overlays_are_drawn_on_the_image_the_vision_grid_sees(tiny, images):
    image = images[0].resize((500, 400))  # not square: resized on its short side, then centre-cropped
    pixels = tiny.processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
    processor = tiny.processor.image_processor
    mean, std = torch.tensor(processor.image_mean)[:, None, None], torch.tensor(processor.image_std)[:, None, None]
    seen = ((pixels * std + mean) * 255).permute(1, 2, 0)
    drawn = torch.tensor(np.asarray(analyze.processed_image(tiny, image)), dtype=torch.float32)
    assert drawn.shape == seen.shape and (drawn - seen).abs().max() <= 1e-3


def test_cli_writes_the_figures_and_the_numbers(tmp_path, capsys):
    out = analyze.run(["model=tiny", "model.num_layers=4", "sample=synthetic:3", "method=fastv", "budget=64",
                       "layers=0,2", "topk=3", f"output_dir={tmp_path}"])
    assert out == tmp_path / "analysis" / "tiny" / "synthetic-3_fastv-64"
    assert str(out) in capsys.readouterr().out
    figures = ["logit_lens.png", "value_output.png", "attention_to_image.png", "sinks.png", "stages.png", "pruning.png"]
    for name in figures:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    result = json.loads((out / "analysis.json").read_text())
    assert result["figures"] == figures
    assert result["input"]["question"] == synthetic_samples(4, seed=1)[3].question  # the shipped split's seed
    assert [len(row["top"]) for row in result["logit_lens"]] == [3] * 4
    assert [row["layer"] for row in result["value_output"]] == [0, 2]
    assert [len(row["heads"]) for row in result["value_output"]] == [4, 4]
    assert len(result["vision_attention"]["tokens"]) == 4 and len(result["value_l1_norms"][0]) == 576
    assert result["pruning"]["vision_tokens_per_layer"] == [576, 576, 64, 64]
    assert len(result["pruning"]["kept_patches"]["2"]) == 64


def test_no_arguments_analyse_the_default_tasks_first_question_with_the_default_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output_dir, results/, relative to the working directory
    out = analyze.run([])
    assert out == Path("results") / "analysis" / "tiny_trained" / "synthetic-0_visipruner"
    result = json.loads((out / "analysis.json").read_text())
    assert result["input"]["question"] == synthetic_samples(1, seed=1)[0].question  # the shipped split's seed
    assert result["method"] == {"name": "visipruner", "budget": "none"} and len(result["logit_lens"]) == 8


@pytest.mark.parametrize(("args", "message"), [
    (["model=nope", "sample=synthetic:0"], "unknown model 'nope'; valid choices: llava13b, llava7b, tiny"),
    (["method=nope", "sample=synthetic:0"], "unknown method 'nope'"),
    (["image=/no/such.png", "question=Why?"], "image /no/such.png does not exist"),
    (["sample=synthetic:1000"], "task synthetic has questions 0..999; got index 1000"),
    (["sample=synthetic-3"], "sample must be TASK:INDEX"),
    (["sample=nope:1"], "unknown task 'nope'"),
    (["sample=gqa:1"], "sample= reads local tasks only (their data ships in tasks/); gqa is a hub task"),
    (["question=Why?"], "give either image=PATH"),
    (["sample=synthetic:0", "layers=8"], "layers must be in 0..7"),  # the default model, tiny_trained, has 8
])
def test_bad_input_fails_before_loading_with_a_clear_message(monkeypatch, args, message):
    monkeypatch.setattr(analyze, "load", lambda *a: pytest.fail("the model must not load"))
    monkeypatch.setattr(sys, "argv", ["harness.analyze", *args])
    with pytest.raises(SystemExit) as exit_:
        analyze.main()
    assert str(exit_.value).startswith("prunebench.analyze: error: ")
    assert message in str(exit_.value)



def test_qwen_attention_maps_lie_on_each_images_own_grid(tmp_path):
    """tiny_qwen25vl, images of two sizes: the attention maps and the pruning record lie on the image's merged token
    grid (rows x columns, 28 px each; 336x224 px is scaled down within max_pixels to 6x9), drawn over the image as
    the processor resized it (no crop)."""
    small, large = noise_images([(100, 90), (336, 224)], seed=0)
    small.save(tmp_path / "small.png")
    out = analyze.run(["model=tiny_qwen25vl", f"image={tmp_path / 'small.png'}", "question=What is this?",
                       "method=fastv", "retain=0.25", "layers=0", "topk=2", f"output_dir={tmp_path}"])
    result = json.loads((out / "analysis.json").read_text())
    assert result["input"]["grid"] == [3, 4] and result["input"]["vision_tokens"] == 12
    assert [len(row) for row in result["vision_attention"]["tokens"]] == [12] * 4
    assert result["pruning"]["selections"]["grid"] == [3, 4]
    assert result["pruning"]["vision_tokens_per_layer"] == [12, 12, 3, 3]
    assert "attention_to_image.png" in result["figures"] and "pruning.png" in result["figures"]

    loaded = tiny_of("tiny_qwen25vl")
    insight = analyze.analyze(loaded, Request(large, "What is this?", "test", "test", [0], 2), None)
    assert insight.grid == (6, 9) and insight.vision_attention.shape == (4, 54)
    for image, (rows, columns) in ((small, (3, 4)), (large, (6, 9))):
        assert analyze.processed_image(loaded, image).size == (columns * 28, rows * 28)
