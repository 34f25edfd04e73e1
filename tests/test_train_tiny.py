"""The script that trains the tiny LLaVA-1.5 model on the synthetic task (`python -m harness.train_tiny`)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from harness import train_tiny
from harness.config import compose
from harness.models import build_tiny, load
from harness.tasks import BACKGROUND, SceneObject


def test_a_resumed_training_equals_an_uninterrupted_one_and_loads_like_a_real_checkpoint(tmp_path, monkeypatch):
    settings = ["--vision-steps", "2", "--vision-batch-size", "2", "--steps", "2", "--batch-size", "2",
                "--full-steps", "1", "--warmup", "1", "--save-every", "1", "--validate-every", "0",
                "--validation-samples", "5"]
    straight = train_tiny.main([*settings, "--out", str(tmp_path / "straight")])

    original = train_tiny.training_batch

    def dies_in_the_second_stage(processor, seed, step, batch_size, rounds):
        if step == 1:
            raise KeyboardInterrupt
        return original(processor, seed, step, batch_size, rounds)

    monkeypatch.setattr(train_tiny, "training_batch", dies_in_the_second_stage)
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
    assert log_first["vision"] == log_second["vision"] and len(log_first["vision"]) == 2
    assert log_first["loss"] == log_second["loss"] and len(log_first["loss"]) == 2
    assert set(log_first["validation"][-1]) == {"step", "overall", "color", "count", "exist", "relation", "read"}

    spec = compose(["model=tiny_trained", f"model.path={resumed}"]).model
    loaded = load(spec, device="cpu")  # the same from_pretrained path as a downloaded checkpoint (saved with the
    # llava-hf key names)
    config = loaded.model.config
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
    assert config.vision_feature_layer == -2 and config.text_config.num_hidden_layers == spec.num_layers == 8
    assert loaded.model.model.language_model.layers[0].self_attn.q_proj.weight.equal(
        second["language_model.model.layers.0.self_attn.q_proj.weight"])
    prompt = loaded.inputs(None, ["What color is the circle? Answer with one word."])
    assert loaded.processor.tokenizer.convert_ids_to_tokens(prompt["input_ids"][0])[0] == "<s>"


def grid(targets: torch.Tensor) -> dict[tuple[int, int], int]:
    """The labelled patches of a 576-patch target, as {(row, column): label}."""
    return {divmod(int(p), 24): int(targets[p]) for p in targets.nonzero()[:, 0]}


def test_patch_targets_label_each_patch_by_the_item_covering_most_of_it():
    square = SceneObject("square", "red", "large", (28, 28, 97, 97))  # pixels 28-97: patches 2-6 both ways
    word = ("dog", (196, 280, 237, 293))  # patches 14-16 of row 20
    targets = train_tiny.patch_targets([square], [word])
    square_patches = {(r, c) for r in range(2, 7) for c in range(2, 7)}
    red = sorted(train_tiny.COLORS).index("red") + 1
    assert grid(targets["color"]) == {**dict.fromkeys(square_patches, red),
                                      **dict.fromkeys([(20, 14), (20, 15), (20, 16)], len(train_tiny.COLORS) + 1)}
    assert grid(targets["shape"]) == dict.fromkeys(square_patches, train_tiny.SHAPES.index("square") + 1)
    assert grid(targets["size"]) == dict.fromkeys(square_patches, sorted(train_tiny.SIZES).index("large") + 1)
    assert grid(targets["word"]) == dict.fromkeys([(20, 14), (20, 15), (20, 16)], train_tiny.WORDS.index("dog") + 1)
    assert grid(targets["center"]) == {(4, 4): 1, (20, 15): 1}
    assert targets["row"][24 * 5 + 7] == 5 and targets["column"][24 * 5 + 7] == 7


def test_foreground_patches_are_those_with_any_drawn_pixel():
    image = Image.new("RGB", (336, 336), BACKGROUND)
    ImageDraw.Draw(image).point([(15, 30), (335, 0)], fill=(0, 0, 0))
    assert grid(train_tiny.foreground_patches(image).long()) == {(2, 1): 1, (0, 23): 1}


def test_leaving_background_tokens_out_equals_masking_them_in_the_full_sequence():
    tokenizer = train_tiny.train_tokenizer(0)
    model, processor = build_tiny(OmegaConf.create({**train_tiny.ARCHITECTURE, "num_layers": 2, "seed": 0}),
                                  tokenizer)
    batch = train_tiny.training_batch(processor, seed=0, step=0, batch_size=2, rounds=1)
    full = {key: batch[key] for key in ("input_ids", "attention_mask", "labels", "pixel_values")}
    is_image = batch["input_ids"] == model.config.image_token_id
    masked = batch["attention_mask"].clone()
    masked[is_image] = batch["foreground"].reshape(-1).long()  # rotary positions stay those of the full sequence
    assert 0 < batch["foreground"].sum() < batch["foreground"].numel()

    for kept, attention_mask in ((1.0, full["attention_mask"]), (0.0, masked)):
        loss, grounding = train_tiny.answer_loss(model, batch, kept, torch.Generator().manual_seed(0), 1)
        model.model.language_model.set_attn_implementation("eager")
        reference = model(**{**full, "attention_mask": attention_mask}, output_attentions=True)
        model.model.language_model.set_attn_implementation("sdpa")
        assert loss.item() == pytest.approx(reference.loss.item(), abs=1e-5)
        attention = reference.attentions[1].mean(1)  # layer 1, mean over heads
        masses = [attention[row, batch["answering"][row, turn]][is_image[row]][batch["evidence"][row, turn]].sum()
                  for row in range(2) for turn in range(batch["answering"].shape[1])
                  if batch["answering"][row, turn] >= 0 and batch["evidence"][row, turn].any()]
        assert len(masses) >= 2 and 0 < min(masses)
        assert grounding.item() == pytest.approx(-torch.stack(masses).add(1e-6).log().mean().item(), abs=1e-5)
    assert model.model.language_model.config._attn_implementation == "sdpa"
