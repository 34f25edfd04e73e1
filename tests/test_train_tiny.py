"""The script that trains the tiny LLaVA-1.5 model on the synthetic task (`python -m harness.train_tiny`)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from harness import train_tiny
from harness.config import compose
from harness.models import load


def test_a_resumed_training_equals_an_uninterrupted_one_and_loads_like_a_real_checkpoint(tmp_path, monkeypatch):
    settings = ["--steps", "3", "--batch-size", "2", "--warmup", "1", "--save-every", "1", "--validate-every", "0",
                "--validation-samples", "5"]
    straight = train_tiny.main([*settings, "--out", str(tmp_path / "straight")])

    original = train_tiny.training_batch

    def dies_at_step_two(processor, seed, step, batch_size):
        if step == 2:
            raise KeyboardInterrupt
        return original(processor, seed, step, batch_size)

    monkeypatch.setattr(train_tiny, "training_batch", dies_at_step_two)
    with pytest.raises(KeyboardInterrupt):
        train_tiny.main([*settings, "--out", str(tmp_path / "resumed")])
    assert (tmp_path / "resumed.train-state.pt").is_file() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(train_tiny, "training_batch", original)
    resumed = train_tiny.main([*settings, "--out", str(tmp_path / "resumed")])
    assert not (tmp_path / "resumed.train-state.pt").exists()

    first, second = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert first.keys() == second.keys() and all(first[k].equal(second[k]) for k in first)
    log_first = json.loads((straight / "training.json").read_text())
    log_second = json.loads((resumed / "training.json").read_text())
    assert log_first["loss"] == log_second["loss"] and len(log_first["loss"]) == 3
    assert set(log_first["validation"][-1]) == {"step", "overall", "color", "count", "exist", "relation", "read"}

    spec = compose(["model=llava7b", f"model.path={resumed}", "model.name=trained", "model.num_layers=8",
                    "model.dtype=float32"]).model
    loaded = load(spec, device="cpu")  # the same from_pretrained path as a downloaded checkpoint (saved with the
    # llava-hf key names)
    config = loaded.model.config
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
    assert config.vision_feature_layer == -2 and config.text_config.num_hidden_layers == 8
    assert loaded.model.model.language_model.layers[0].self_attn.q_proj.weight.equal(
        second["language_model.model.layers.0.self_attn.q_proj.weight"])
    prompt = loaded.inputs(None, ["What color is the circle? Answer with one word."])
    assert loaded.processor.tokenizer.convert_ids_to_tokens(prompt["input_ids"][0])[0] == "<s>"
