"""The script that trains the tiny LLaVA-1.5 model on the synthetic task (`python -m harness.train_tiny`)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from harness import train_tiny
from harness.config import compose
from harness.models import build_tiny, load, vicuna_v1_prompt
from harness.tasks import BACKGROUND, CATEGORIES, SceneObject


def test_a_resumed_training_equals_an_uninterrupted_one_and_loads_like_a_real_checkpoint(tmp_path, monkeypatch):
    settings = ["--vision-steps", "2", "--vision-batch-size", "2", "--steps", "2", "--batch-size", "2",
                "--full-steps", "1", "--warmup", "1", "--pool", "3", "--save-every", "1", "--validate-every", "0",
                "--validation-samples", "5", "--previous-weight", "0.02", "--part-size", "0"]
    straight = train_tiny.main([*settings, "--out", str(tmp_path / "straight")])
    in_parts = train_tiny.main([*settings, "--part-size", "1", "--out", str(tmp_path / "parts")])

    original = train_tiny.training_batch

    def dies_in_the_second_stage(pool, tokenizer, image_token, seed, step, *args, **kwargs):
        if step == 1:
            raise KeyboardInterrupt
        return original(pool, tokenizer, image_token, seed, step, *args, **kwargs)

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
    log_parts = json.loads((in_parts / "training.json").read_text())  # the same steps up to rounding
    assert log_parts["vision"] == log_first["vision"]
    assert log_parts["loss"] == pytest.approx(log_first["loss"], rel=1e-4)
    assert log_parts["early_loss"] == pytest.approx(log_first["early_loss"], rel=1e-4)
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


def test_scene_targets_name_the_colours_shapes_objects_and_words_a_scene_holds():
    objects = [SceneObject("square", "red", "large", (28, 28, 97, 97)),
               SceneObject("circle", "blue", "small", (150, 150, 180, 180))]
    targets = train_tiny.scene_targets(objects, [("dog", (196, 280, 237, 293))])
    held = {train_tiny.SCENE_LABELS[i] for i in targets.nonzero()[:, 0].tolist()}
    assert held == {("color", "red"), ("color", "blue"), ("shape", "square"), ("shape", "circle"),
                    ("object", ("red", "square", "large")), ("object", ("blue", "circle", "small")), ("word", "dog")}
    assert len(train_tiny.SCENE_LABELS) == 6 + 3 + 6 * 3 * 2 + 8 and targets.sum() == 7


def test_the_cls_read_out_adds_its_weighted_multi_label_loss_on_the_feature_layer_cls_state():
    spec = OmegaConf.create({**train_tiny.ARCHITECTURE, "seed": 0, "num_layers": 1})
    model, processor = build_tiny(spec)
    torch.manual_seed(0)
    width = model.config.vision_config.hidden_size
    head = torch.nn.Linear(width, sum(train_tiny.VISION_TARGETS.values()))
    cls_head = torch.nn.Linear(width, len(train_tiny.SCENE_LABELS))
    pixel_values, targets = train_tiny.vision_batch(processor, seed=0, step=0, batch_size=2,
                                                    device=torch.device("cpu"))
    plain, accuracy = train_tiny.vision_loss(model, head, cls_head, pixel_values, targets, cls_weight=0.0)
    weighted, with_cls = train_tiny.vision_loss(model, head, cls_head, pixel_values, targets, cls_weight=0.5)
    cls_state = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 0]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(cls_head(cls_state), targets["scene"])
    assert "scene" not in accuracy and 0.0 <= with_cls["scene"] <= 1.0
    assert torch.allclose(weighted - plain, 0.5 * expected, atol=1e-6)
    weighted.backward()
    assert cls_head.weight.grad.abs().sum() > 0


def test_foreground_patches_are_those_with_any_drawn_pixel():
    image = Image.new("RGB", (336, 336), BACKGROUND)
    ImageDraw.Draw(image).point([(15, 30), (335, 0)], fill=(0, 0, 0))
    assert grid(train_tiny.foreground_patches(image).long()) == {(2, 1): 1, (0, 23): 1}


def test_a_branched_batch_equals_each_question_asked_alone_through_the_model():
    tokenizer = train_tiny.train_tokenizer(0)
    model, processor = build_tiny(OmegaConf.create({**train_tiny.ARCHITECTURE, "num_layers": 2, "seed": 0}),
                                  tokenizer)
    image_token = model.config.image_token_id
    pool = train_tiny.ScenePool(model, processor, seed=0, size=3, refresh=1, step=1)  # scenes 1, 2, 3
    assert [pool.scenes[k % 3] for k in (1, 2, 3)] == [train_tiny.pool_scene(0, k)[1:] for k in (1, 2, 3)]
    for object_kept, background_kept in ((1.0, 1.0), (1.0, 0.0), (0.0, 0.0)):  # all, every item token, centres
        batch = train_tiny.training_batch(pool, tokenizer, image_token, seed=0, step=0, batch_size=2, rounds=1,
                                          object_kept=object_kept, background_kept=background_kept)
        logits = model.lm_head(train_tiny.language_model_states(model, batch)[0][batch["labels"] != -100])
        expected, asked = [], 0
        for row, slot in enumerate(batch["slots"].tolist()):
            image = train_tiny.pool_scene(0, next(k for k in (1, 2, 3) if k % 3 == slot))[0]
            centre = torch.zeros(576, dtype=torch.bool)
            centre[train_tiny.centre_patches(*pool.scenes[slot])] = True
            visible = centre | train_tiny.foreground_patches(image) if object_kept else centre
            if background_kept:
                visible = torch.ones(576, dtype=torch.bool)
            segments, ids = batch["segments"][row], batch["input_ids"][row]
            prefix = ids[(segments == 0) & (ids != image_token)].tolist()
            assert (ids == image_token).sum() == visible.sum()
            for branch in range(1, int(segments.max()) + 1):
                tokens = ids[segments == branch].tolist()
                question = tokenizer.decode(tokens).split(" ASSISTANT:")[0].strip()
                prompt = processor(images=[image], text=[vicuna_v1_prompt(question)], return_tensors="pt")
                question_length = prompt["input_ids"].shape[1] - len(prefix) - 576
                assert prompt["input_ids"][0].tolist() == prefix + [image_token] * 576 + tokens[:question_length]
                input_ids = torch.tensor([prefix + [image_token] * 576 + tokens])
                mask = torch.ones_like(input_ids)
                mask[0, len(prefix): len(prefix) + 576] = visible.long()  # same positions
                out = model(input_ids=input_ids, pixel_values=prompt["pixel_values"], attention_mask=mask)
                labelled = batch["labels"][row][segments == branch] != -100
                assert labelled.nonzero()[0, 0] == question_length - 1  # the prompt's last token predicts the answer
                early = batch["early_labels"][row][segments == branch]  # every question token after the newline
                first_answer_token = batch["labels"][row][segments == branch][labelled][0]
                assert early[0] == -100 and (early[1: question_length - 1] == first_answer_token).all()
                assert (early[question_length - 1:] == -100).all()
                expected.append(out.logits[0, -len(tokens):][labelled])
                asked += 1
        assert asked >= 4 and batch["labels"][batch["labels"] != -100].numel() == logits.shape[0]
        torch.testing.assert_close(logits, torch.cat(expected), atol=1e-4, rtol=1e-4)


def test_stage_two_sees_item_centres_first_then_ramps_in_the_other_image_tokens():
    args = argparse.Namespace(steps=10, centre_steps=3, ramp_steps=4, background_kept=0.1, full_steps=2,
                              reweight=False)
    shares = [train_tiny.image_tokens_kept(step, args) for step in range(10)]
    assert shares[:3] == [(0.0, 0.0, False)] * 3  # centres only
    assert [round(item, 6) for item, _, _ in shares[3:8]] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [round(background, 6) for _, background, _ in shares[3:8]] == [0.025, 0.05, 0.075, 0.1, 0.1]
    assert shares[8:] == [(1.0, 1.0, False)] * 2  # the last full steps see every token
    args.reweight = True  # from the end of the ramp on
    reweighted = [train_tiny.image_tokens_kept(step, args)[2] for step in range(10)]
    assert reweighted == [False] * 6 + [True] * 2 + [False] * 2


def test_a_reweighted_image_token_weighs_as_much_as_that_many_copies_of_it():
    """With --reweight a kept background token drawn with probability 1/2 carries a key bias of log 2: the batch's
    hidden states equal those of the same rows with each such token present twice (same features, same position,
    the same tokens in view), in every layer."""
    tokenizer = train_tiny.train_tokenizer(0)
    model, processor = build_tiny(OmegaConf.create({**train_tiny.ARCHITECTURE, "num_layers": 2, "seed": 0}),
                                  tokenizer)
    pool = train_tiny.ScenePool(model, processor, seed=0, size=2, refresh=1, step=0)
    batch = train_tiny.training_batch(pool, tokenizer, model.config.image_token_id, seed=0, step=0, batch_size=2,
                                      rounds=1, object_kept=1.0, background_kept=0.5, reweight=True)
    doubled = batch["key_bias"] != 0
    assert doubled.sum() > 100 and torch.allclose(batch["key_bias"][doubled], torch.tensor(math.log(2)))
    with torch.no_grad():
        hidden = train_tiny.language_model_states(model, batch)[0]
        ids, embeds = batch["input_ids"], train_tiny.input_embeddings(model, batch)
        visible = train_tiny.branch_mask(batch["segments"])
        for row in range(2):
            copies = torch.arange(ids.shape[1]).repeat_interleave(1 + doubled[row].long())
            twice = model.model.language_model(inputs_embeds=embeds[row, copies][None],
                                               attention_mask=visible[row, :, copies][:, :, copies][None],
                                               position_ids=batch["position_ids"][row, copies][None]).last_hidden_state
            first_copy = torch.cat([torch.tensor([True]), copies[1:] != copies[:-1]])
            real = batch["segments"][row] >= 0
            torch.testing.assert_close(twice[0, first_copy][real], hidden[row, real], atol=2e-5, rtol=1e-4)
    plain = train_tiny.training_batch(pool, tokenizer, model.config.image_token_id, seed=0, step=0, batch_size=2,
                                      rounds=1, object_kept=1.0, background_kept=0.5)
    assert not plain["key_bias"].any() and plain["input_ids"].equal(ids)  # the same tokens, unweighted


def test_a_step_in_parts_of_similar_length_equals_the_whole_batch():
    tokenizer = train_tiny.train_tokenizer(0)
    model, processor = build_tiny(OmegaConf.create({**train_tiny.ARCHITECTURE, "num_layers": 2, "seed": 0}),
                                  tokenizer)
    image_token = model.config.image_token_id
    pool = train_tiny.ScenePool(model, processor, seed=0, size=6, refresh=1, step=0)
    batch = train_tiny.training_batch(pool, tokenizer, image_token, seed=0, step=0, batch_size=5, rounds=1,
                                      object_kept=1.0, background_kept=0.3, reweight=True)

    previous_head = torch.nn.Linear(model.config.text_config.hidden_size, model.config.text_config.vocab_size)
    model.previous_head = previous_head  # so that its gradients are compared too

    def step(parts, counts):
        model.zero_grad()
        losses = [train_tiny.answer_losses(model, part, counts, previous_head) for part in parts]
        sum(answer + 0.5 * early + 0.3 * previous for answer, early, previous in losses).backward()
        return ([sum(loss[i].item() for loss in losses) for i in (0, 1, 2)],
                {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})

    parts = train_tiny.batch_parts(batch, 2, image_token)
    lengths = [int((part["segments"] >= 0).sum(1).max()) for part in parts]
    assert [len(part["input_ids"]) for part in parts] == [2, 2, 1] and lengths == sorted(lengths)
    assert [part["input_ids"].shape[1] for part in parts] == lengths  # each part trimmed to its longest row
    assert lengths[0] < lengths[-1] == batch["input_ids"].shape[1]  # only the longest rows keep the batch's width
    assert sum(len(part["features"]) for part in parts) == len(batch["features"])
    rows = {slot: row for row, slot in enumerate(batch["slots"].tolist())}  # each part keeps its rows' scene slots
    assert sorted(torch.cat([part["slots"] for part in parts]).tolist()) == sorted(rows)
    for part in parts:
        ids = part["input_ids"]
        assert all(ids[i].equal(batch["input_ids"][rows[slot], : ids.shape[1]])
                   for i, slot in enumerate(part["slots"].tolist()))
    whole_losses, whole = step([batch], None)
    part_losses, summed = step(parts, train_tiny.label_counts(batch))
    trained = {"model.multi_modal_projector.linear_1.weight", "previous_head.weight"}
    assert whole.keys() == summed.keys() and trained <= whole.keys()
    torch.testing.assert_close(part_losses, whole_losses, rtol=1e-5, atol=1e-6)
    for name in whole:
        torch.testing.assert_close(summed[name], whole[name], rtol=1e-4, atol=1e-6)


def test_the_previous_token_loss_asks_each_early_answered_token_for_the_token_before_it(monkeypatch):
    tokenizer = train_tiny.train_tokenizer(0)
    model, processor = build_tiny(OmegaConf.create({**train_tiny.ARCHITECTURE, "num_layers": 2, "seed": 0}),
                                  tokenizer)
    pool = train_tiny.ScenePool(model, processor, seed=0, size=2, refresh=1, step=0)
    batch = train_tiny.training_batch(pool, tokenizer, model.config.image_token_id, seed=0, step=0, batch_size=2,
                                      rounds=1, object_kept=0.0, background_kept=0.0)
    vocab = model.config.text_config.vocab_size
    reader = torch.nn.Linear(vocab, vocab)  # reads a one-hot "first layer output" back as logits
    with torch.no_grad():
        reader.weight.copy_(torch.eye(vocab) * 50)
        reader.bias.zero_()
    final = train_tiny.language_model_states(model, batch)[0]
    tokens = torch.nn.functional.one_hot(batch["input_ids"], vocab).float()
    losses = {}
    for name, first in (("previous", tokens.roll(1, dims=1)), ("own", tokens), ("next", tokens.roll(-1, dims=1))):
        monkeypatch.setattr(train_tiny, "language_model_states", lambda model, batch, first=first: (final, first))
        losses[name] = train_tiny.answer_losses(model, batch, previous_head=reader)[2].item()
    assert losses["previous"] < 1e-6 and losses["own"] > 10 and losses["next"] > 10
    assert train_tiny.answer_losses(model, batch)[2].item() == 0.0  # off without a head


def test_the_previous_token_loss_asks_only_the_questions_of_its_categories():
    tokenizer = train_tiny.train_tokenizer(0)
    model, processor = build_tiny(OmegaConf.create({**train_tiny.ARCHITECTURE, "num_layers": 2, "seed": 0}),
                                  tokenizer)
    pool = train_tiny.ScenePool(model, processor, seed=0, size=3, refresh=1, step=0)

    def batch(categories):
        return train_tiny.training_batch(pool, tokenizer, model.config.image_token_id, seed=0, step=0, batch_size=3,
                                         rounds=2, object_kept=0.0, background_kept=0.0,
                                         previous_categories=categories)

    every, reading, none = batch(CATEGORIES), batch(("read",)), batch(())
    early = every["early_labels"] != train_tiny.IGNORE
    asked = every["previous_labels"] != train_tiny.IGNORE
    assert asked.equal(early) and every["previous_labels"][:, 1:][early[:, 1:]].equal(
        every["input_ids"][:, :-1][early[:, 1:]])  # every early-answered token, for the token before it
    assert not (none["previous_labels"] != train_tiny.IGNORE).any()
    questions = 0
    for row in range(3):
        for branch in range(1, int(reading["segments"][row].max()) + 1):
            tokens = reading["segments"][row] == branch
            question = tokenizer.decode(reading["input_ids"][row, tokens])
            is_read = "word is written" in question
            questions += is_read
            expected = every["previous_labels"][row, tokens] if is_read else torch.full_like(
                every["previous_labels"][row, tokens], train_tiny.IGNORE)
            assert reading["previous_labels"][row, tokens].equal(expected), question
    assert questions > 0
    with torch.no_grad():
        head = torch.nn.Linear(model.config.text_config.hidden_size, model.config.text_config.vocab_size)
        assert train_tiny.answer_losses(model, none, previous_head=head)[2].item() == 0.0  # nothing asked: no loss
