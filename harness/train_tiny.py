"""Train a tiny LLaVA-1.5 model on the synthetic task: `python -m harness.train_tiny`.

The model has LLaVA-1.5's geometry and classes (`LlavaForConditionalGeneration`: a CLIP vision tower at 336 px /
patch 14 -> 576 vision tokens, features from its second-to-last layer, a two-layer MLP projector, a Llama language
model) at tiny widths, so that it trains on a 2-core CPU. Everything is trained from scratch on scenes that
`harness.tasks` draws on the fly (never the shipped test split), in two stages, as LLaVA starts from a vision tower
that already sees:
1. seeing (`--vision-steps`): the vision tower alone, with a linear read-out of every patch's colour, shape, size,
   word, row, column and whether it holds an item's centre (targets from the scene's geometry);
2. answering (`--steps`): the tower frozen, the projector (its first layer started as stage 1's read-out) and the
   language model learn vicuna_v1 conversations of several questions per scene, the first turn exactly the prompt
   the harness evaluates; only answer tokens are scored. Most plain-background image tokens are left out of the input
   to save time (positions kept), except in the last `--full-steps`. Optionally a grounding loss teaches one layer's
   attention, from the token that predicts an answer, to look at the answer's evidence (`harness.tasks.ask`).

Deterministic from `--seed`: the weights are initialised from it and step `s` always trains on the same scenes, so a
resumed run (the state is saved every `--save-every` steps; rerun the same command) equals an uninterrupted one. The
result is a `from_pretrained` checkpoint (safetensors, config, tokenizer, processor) that the harness loads like a
downloaded one (`model=tiny_trained`, or `model.path=<out>`), plus `training.json` (settings, losses, validation
accuracy per category). No trained model ships yet: stage 1 learns to see, but stage 2 has not yet got past the
answer priors within the time allowed (README, "Training the tiny model").
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw
from tqdm import tqdm

from harness.evaluate import ROOT
from harness.models import TOKENIZER_SPECIALS, build_tiny, fast_tokenizer, vicuna_v1_prompt
from harness.results import write_json_atomic
from harness.tasks import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    SHAPES,
    SIZE,
    SIZES,
    WORDS,
    ask,
    draw_scene,
    draw_shape,
    score,
    synthetic_samples,
)

ARCHITECTURE = dict(  # LLaVA-1.5 geometry; widths small enough for a CPU, depth enough for layer-wise dynamics
    name="tiny_trained", source="tiny", image_size=336, patch_size=14, num_vision_tokens=576,
    num_layers=8, hidden_size=128, intermediate_size=384, num_heads=4, num_kv_heads=4,
    vision_hidden_size=96, vision_layers=3, attn_implementation="sdpa",
)
VOCAB_SIZE = 512
VALIDATION_SEED = 2  # the shipped test split is seed 1; training scenes come from their own string-seeded streams
IGNORE = -100
DEFINING = ("seed", "vision_steps", "vision_batch_size", "vision_lr", "steps", "batch_size", "rounds", "lr", "warmup",
            "background_kept", "full_steps", "grounded_layer", "grounding_weight")  # settings a resumed run must share


def train_tokenizer(seed: int):
    """A byte-level BPE tokenizer fitted to the task's prompts and answers (any text still encodes, byte by byte)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = [vicuna_v1_prompt(s.question, with_image=False) + f" {s.answer}"
              for s in synthetic_samples(2000, seed=f"tokenizer-{seed}")]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=TOKENIZER_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    return fast_tokenizer(backend)


# Stage 1 ("seeing"): per-patch targets for the vision tower, read off the scene's geometry.
PATCHES_PER_SIDE = ARCHITECTURE["image_size"] // ARCHITECTURE["patch_size"]  # 24
PATCH = ARCHITECTURE["patch_size"]
VISION_TARGETS = {  # name: classes (0 = background or not applicable, except for row and column)
    "color": len(COLORS) + 2,  # the object's colour, or the last class for printed text
    "shape": len(SHAPES) + 1, "size": len(SIZES) + 1, "word": len(WORDS) + 1,  # of the object / word under the patch
    "row": PATCHES_PER_SIDE, "column": PATCHES_PER_SIDE,  # where the patch is
    "center": 2,  # the patch holds an object's or word's centre: one patch per item, what counting needs
}
FOREGROUND_ONLY = ("shape", "size", "word")  # scored only on patches that show an object / a word
MIN_COVER = 30  # pixels of the 196 in a patch that an item must cover to label the patch


def per_patch(pixels: torch.Tensor) -> torch.Tensor:
    """(576, 196): a 336x336 image plane cut into its patches, row by row."""
    side = PATCHES_PER_SIDE
    return pixels.reshape(side, PATCH, side, PATCH).transpose(1, 2).reshape(side * side, PATCH * PATCH)


def item_map(objects, words) -> torch.Tensor:
    """Which item (1.. over `words` then `objects`; 0: none) covers most of each of the 576 patches, if at least
    MIN_COVER of its pixels."""
    index = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(index)
    for number, (_, box) in enumerate(words, start=1):
        draw.rectangle(box, fill=number)
    for number, item in enumerate(objects, start=len(words) + 1):
        draw_shape(draw, item.shape, item.box, number)
    pixels = per_patch(torch.tensor(np.asarray(index), dtype=torch.long))
    cover = torch.nn.functional.one_hot(pixels, 1 + len(words) + len(objects)).sum(1)
    cover[:, 0] = 0
    return torch.where(cover.amax(1) >= MIN_COVER, cover.argmax(1), 0)


def patch_targets(objects, words) -> dict[str, torch.Tensor]:
    """The VISION_TARGETS of a scene's 576 patches: each patch labelled by the item covering most of it."""
    dominant = item_map(objects, words)
    side = PATCHES_PER_SIDE
    targets = {name: torch.zeros(side * side, dtype=torch.long) for name in VISION_TARGETS}
    targets["row"], targets["column"] = torch.arange(side * side) // side, torch.arange(side * side) % side
    colors = sorted(COLORS)
    for number, item in enumerate([*words, *objects], start=1):
        on = dominant == number
        box = item[1] if number <= len(words) else item.box
        targets["center"][int((box[1] + box[3]) / 2 // PATCH) * side + int((box[0] + box[2]) / 2 // PATCH)] = 1
        if number <= len(words):
            targets["color"][on], targets["word"][on] = len(COLORS) + 1, WORDS.index(item[0]) + 1
        else:
            targets["color"][on] = colors.index(item.color) + 1
            targets["shape"][on], targets["size"][on] = SHAPES.index(item.shape) + 1, sorted(SIZES).index(item.size) + 1
    return targets


def vision_batch(processor, seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-1 images of step `step` (more words per scene than the task draws: reading is the slowest to learn) and
    their patch targets."""
    rng = random.Random(f"see-{seed}-{step}")
    scenes = [draw_scene(rng, num_words=(2, 4)) for _ in range(batch_size)]
    pixel_values = processor.image_processor([image for image, _, _ in scenes], return_tensors="pt")["pixel_values"]
    targets = [patch_targets(objects, words) for _, objects, words in scenes]
    return pixel_values, {name: torch.stack([t[name] for t in targets]) for name in VISION_TARGETS}


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The tower's patch features at LLaVA's feature layer (what the projector reads), CLS dropped."""
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]


def vision_loss(model, head, pixel_values, targets) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed cross-entropy of the per-patch targets, and each target's accuracy on the patches it is scored on."""
    logits = head(vision_features(model, pixel_values)).split(list(VISION_TARGETS.values()), dim=-1)
    loss, accuracy = 0.0, {}
    for (name, _), scores in zip(VISION_TARGETS.items(), logits, strict=True):
        scored = targets[name] > 0 if name in FOREGROUND_ONLY else torch.ones_like(targets[name], dtype=torch.bool)
        loss = loss + torch.nn.functional.cross_entropy(scores[scored], targets[name][scored])
        accuracy[name] = (scores.argmax(-1) == targets[name])[scored].float().mean().item()
    return loss, accuracy


# Stage 2 ("answering"): the projector and the language model learn the questions; the tower is frozen.
def scene_conversation(rng: random.Random, rounds: int):
    """A scene and up to `rounds` questions of every category about it (no question twice), in random order:
    the image and [(question, answer, evidence patches)]."""
    while True:
        image, objects, words = draw_scene(rng)
        if len(objects) < 2 or not words:
            continue
        asked: dict[str, tuple[str, list]] = {}
        for _ in range(rounds):
            for category in CATEGORIES:
                if found := ask(category, objects, words, rng):
                    asked.setdefault(found[0], found[1:])
        if not asked:
            continue
        items, dominant = [*words, *objects], item_map(objects, words)
        turns = [(question, answer, torch.isin(dominant, torch.tensor([items.index(e) + 1 for e in evidence])))
                 for question, (answer, evidence) in asked.items()]
        rng.shuffle(turns)
        return image, turns


def encode(processor, image, turns) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """input_ids, pixel_values and labels of one conversation: the vicuna_v1 prompt (image expanded to its 576 tokens)
    then `answer</s>USER: question ASSISTANT:` per later turn; only answers and their `</s>` are labelled. Also the
    position of the token before each answer (the one that predicts it)."""
    tokenizer = processor.tokenizer
    first = processor(images=[image], text=[vicuna_v1_prompt(turns[0][0])], return_tensors="pt")
    ids, labels = first["input_ids"][0].tolist(), [IGNORE] * first["input_ids"].shape[1]
    answering = []
    for index, (_, answer, _) in enumerate(turns):
        answer_ids = tokenizer(f" {answer}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        answering.append(len(ids) - 1)
        ids += answer_ids
        labels += answer_ids
        if index + 1 < len(turns):
            question_ids = tokenizer(f"USER: {turns[index + 1][0]} ASSISTANT:", add_special_tokens=False)["input_ids"]
            ids += question_ids
            labels += [IGNORE] * len(question_ids)
    return torch.tensor(ids), first["pixel_values"][0], torch.tensor(labels), answering


def foreground_patches(image: Image.Image) -> torch.Tensor:
    """Which of the 576 patches show anything but the plain background."""
    return per_patch(torch.tensor((np.asarray(image) != BACKGROUND).any(-1))).any(1)


def training_batch(processor, seed: int, step: int, batch_size: int, rounds: int) -> dict[str, torch.Tensor]:
    """The stage-2 conversations of step `step`, right-padded: the same for every run with this seed, resumed or
    not. `answering` ((B, turns), -1: none) and `evidence` ((B, turns, 576)): where each answer is predicted, and the
    patches of the objects or words it rests on."""
    rng = random.Random(f"train-{seed}-{step}")
    scenes = [scene_conversation(rng, rounds) for _ in range(batch_size)]
    encoded = [encode(processor, image, turns) for image, turns in scenes]
    length, most_turns = max(len(ids) for ids, *_ in encoded), max(len(turns) for _, turns in scenes)
    input_ids = torch.full((batch_size, length), processor.tokenizer.pad_token_id)
    labels = torch.full((batch_size, length), IGNORE)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    answering = torch.full((batch_size, most_turns), -1)
    evidence = torch.zeros(batch_size, most_turns, PATCHES_PER_SIDE ** 2, dtype=torch.bool)
    for row, ((ids, _, row_labels, positions), (_, turns)) in enumerate(zip(encoded, scenes, strict=True)):
        input_ids[row, : len(ids)], labels[row, : len(ids)], attention_mask[row, : len(ids)] = ids, row_labels, 1
        answering[row, : len(turns)] = torch.tensor(positions)
        evidence[row, : len(turns)] = torch.stack([patches for _, _, patches in turns])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": torch.stack([pixels for _, pixels, *_ in encoded]),
            "foreground": torch.stack([foreground_patches(image) for image, _ in scenes]),
            "answering": answering, "evidence": evidence}


def answer_loss(model, batch: dict[str, torch.Tensor], background_kept: float, generator: torch.Generator,
                grounded_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The answers' next-token loss with the tower frozen, and the grounding loss: -log of the attention (mean over
    heads, layer `grounded_layer`) that the token predicting an answer pays to the answer's evidence patches, averaged
    over the answers that have evidence (0 without a grounded layer). Image tokens of plain background enter the
    language model only with probability `background_kept` (1: the full sequence, what the model is evaluated on);
    the tokens that do keep their original positions, so fewer tokens cost less but look the same to rotary
    attention."""
    llava, image_token = model.model, model.config.image_token_id
    with torch.no_grad():
        features = vision_features(model, batch["pixel_values"])
    image = llava.multi_modal_projector(features)
    ids = batch["input_ids"]
    is_image = ids == image_token
    embeds = llava.get_input_embeddings()(ids).masked_scatter(is_image[..., None], image.to(model.dtype))
    drawn = batch["foreground"] | (torch.rand(batch["foreground"].shape, generator=generator) < background_kept)
    keep = batch["attention_mask"].bool() & ~is_image
    keep[is_image] = drawn.reshape(-1)  # image tokens are never padding: padding only ends a row
    order = torch.argsort((~keep).int(), dim=1, stable=True)[:, : int(keep.sum(1).max())]  # kept first, in order
    kept = keep.gather(1, order)
    embeds = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]))
    labels = batch["labels"].gather(1, order).masked_fill(~kept, IGNORE)
    backend = llava.language_model.config._attn_implementation
    if grounded_layer is not None:  # sdpa hands back no attention probabilities
        llava.language_model.set_attn_implementation("eager")
    try:
        out = llava.language_model(inputs_embeds=embeds, attention_mask=kept.long(), position_ids=order,
                                   output_attentions=grounded_layer is not None)
    finally:
        llava.language_model.set_attn_implementation(backend)
    logits = model.lm_head(out.last_hidden_state[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
    if grounded_layer is None:
        return loss, loss.new_zeros(())
    attention = out.attentions[grounded_layer].mean(1)  # (B, kept, kept)
    new_index = keep.long().cumsum(1) - 1  # where each kept original position sits in the kept sequence
    rows, turns = ((batch["answering"] >= 0) & batch["evidence"].any(-1)).nonzero(as_tuple=True)
    queries = new_index[rows, batch["answering"][rows, turns]]
    image_positions = is_image.nonzero()[:, 1].view(len(ids), -1)[rows]  # (n, 576) original positions
    image_attention = attention[rows, queries].gather(1, new_index[rows].gather(1, image_positions))
    # A patch under a word's box may hold no ink: left out with the background, it is no evidence either.
    evidence = batch["evidence"][rows, turns] & keep[rows].gather(1, image_positions)
    mass = (image_attention * evidence).sum(-1)
    return loss, -(mass + 1e-6).log().mean()


def start_projector_from(head: torch.nn.Linear, model) -> None:
    """Stage 2 starts the projector's first layer as stage 1's read-out (in its first units), so that the language
    model receives each patch's colour, shape, word and position as separate directions from the first step. Measured
    (README): with it the grounding loss trains; from a random projector it did not move in 130 steps."""
    first = model.model.multi_modal_projector.linear_1
    with torch.no_grad():
        first.weight[: head.out_features] = head.weight
        first.bias[: head.out_features] = head.bias


def learning_rate(step: int, args) -> float:
    """Per stage: linear warm-up, then cosine decay to a tenth."""
    if step < args.vision_steps:
        peak, steps = args.vision_lr, args.vision_steps
    else:
        peak, steps, step = args.lr, args.steps, step - args.vision_steps
    if step < args.warmup:
        return peak * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, steps - args.warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validate(model, processor, num_samples: int, batch_size: int = 16) -> dict[str, float]:
    """Greedy accuracy per category (and overall) on validation scenes, prompted exactly as the harness prompts."""
    model.eval()
    processor.tokenizer.padding_side = "left"
    samples = synthetic_samples(num_samples, seed=VALIDATION_SEED)
    correct: dict[str, list[float]] = {category: [] for category in CATEGORIES}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start: start + batch_size]
        inputs = processor(images=[s.image for s in chunk], text=[vicuna_v1_prompt(s.question) for s in chunk],
                           padding=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for sample, text in zip(chunk, texts, strict=True):
            correct[sample.category].append(score(text, sample.answer))
    model.train()
    accuracy = {category: sum(v) / len(v) for category, v in correct.items()}
    accuracy["overall"] = sum(sum(v) for v in correct.values()) / len(samples)
    return accuracy


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "tiny_trained",
                        help="checkpoint directory written at the end")
    parser.add_argument("--state", type=Path, default=None,
                        help="resumable training state (default: <out>.train-state.pt; deleted when training ends)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-steps", type=int, default=1000, help="stage 1: steps of the vision tower alone")
    parser.add_argument("--vision-batch-size", type=int, default=32, help="stage 1: images per step")
    parser.add_argument("--vision-lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=600, help="stage 2: steps of projector and language model")
    parser.add_argument("--batch-size", type=int, default=16, help="stage 2: scenes per step")
    parser.add_argument("--rounds", type=int, default=3, help="stage 2: questions of each category per scene, at most")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30, help="warm-up steps of each stage")
    parser.add_argument("--background-kept", type=float, default=0.1,
                        help="stage 2: share of plain-background image tokens kept, but in the last --full-steps")
    parser.add_argument("--full-steps", type=int, default=100, help="stage 2: final steps on all 576 image tokens")
    parser.add_argument("--grounded-layer", type=lambda v: None if v == "none" else int(v), default=3,
                        help="stage 2: the decoder layer whose attention is taught to look at the evidence (none: "
                             "no grounding loss)")
    parser.add_argument("--grounding-weight", type=float, default=1.0, help="stage 2: weight of the grounding loss")
    parser.add_argument("--save-every", type=int, default=25, help="steps between saves of the training state")
    parser.add_argument("--validate-every", type=int, default=150,
                        help="stage-2 steps between validations (0: at the end only)")
    parser.add_argument("--validation-samples", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.grounded_layer is not None and not 0 <= args.grounded_layer < ARCHITECTURE["num_layers"]:
        parser.error(f"--grounded-layer must be in 0..{ARCHITECTURE['num_layers'] - 1} or none")
    if args.threads:
        torch.set_num_threads(args.threads)
    state_path = args.state or args.out.with_name(args.out.name + ".train-state.pt")

    tokenizer = train_tokenizer(args.seed)
    model, processor = build_tiny(OmegaConf.create({**ARCHITECTURE, "seed": args.seed}), tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        head = torch.nn.Linear(model.config.vision_config.hidden_size, sum(VISION_TARGETS.values()))
    # One optimiser for both stages: AdamW leaves alone the parameters that a stage gives no gradient.
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    log: dict = {"settings": {**vars(args), "out": str(args.out), "state": str(state_path)},
                 "architecture": ARCHITECTURE, "vision": [], "loss": [], "grounding": [], "validation": [],
                 "seconds": 0.0}
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        saved = state["log"]["settings"]
        differ = [key for key in DEFINING if saved.get(key) != getattr(args, key)]
        if differ:
            raise SystemExit(f"{state_path} belongs to another run ({', '.join(differ)} differ); delete it to start "
                             "afresh")
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        start, log = state["step"], state["log"]
        print(f"resuming from step {start} ({state_path})")
    model.train()
    began = time.monotonic() - log["seconds"]
    total = args.vision_steps + args.steps
    with tqdm(range(start, total), initial=start, total=total, desc="train_tiny", unit="step") as bar:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            seeing = step < args.vision_steps
            if seeing:
                loss, accuracy = vision_loss(model, head, *vision_batch(processor, args.seed, step,
                                                                         args.vision_batch_size))
                log["vision"].append({"loss": round(loss.item(), 4), **{k: round(v, 3) for k, v in accuracy.items()}})
                bar.set_description(f"train_tiny (seeing: shape {accuracy['shape']:.2f} word {accuracy['word']:.2f})")
            else:
                stage_step = step - args.vision_steps
                if stage_step == 0:
                    start_projector_from(head, model)
                batch = training_batch(processor, args.seed, stage_step, args.batch_size, args.rounds)
                full = stage_step >= args.steps - args.full_steps
                generator = torch.Generator().manual_seed(args.seed * 1_000_003 + stage_step)
                answering, grounding = answer_loss(model, batch, 1.0 if full else args.background_kept, generator,
                                                   args.grounded_layer)
                loss = answering + args.grounding_weight * grounding
                log["loss"].append(round(answering.item(), 5))
                log["grounding"].append(round(grounding.item(), 5))
                bar.set_description("train_tiny (answering)")
            loss.backward()
            trained = [p for p in [*model.parameters(), *head.parameters()] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            done = step + 1
            if (not seeing and args.validate_every and (done - args.vision_steps) % args.validate_every == 0
                    and done < total):
                log["validation"].append({"step": done, **validate(model, processor, args.validation_samples)})
                bar.write(f"step {done}: validation {json.dumps(log['validation'][-1])}")
            if done % args.save_every == 0 or done == total:
                log["seconds"] = time.monotonic() - began
                torch.save({"step": done, "model": model.state_dict(), "head": head.state_dict(),
                            "optimizer": optimizer.state_dict(), "log": log}, state_path.with_suffix(".tmp"))
                state_path.with_suffix(".tmp").replace(state_path)

    log["validation"].append({"step": total, **validate(model, processor, args.validation_samples)})
    print(f"validation accuracy after {total} steps: {json.dumps(log['validation'][-1])}")
    log["seconds"] = round(time.monotonic() - began, 1)
    model.eval()
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    write_json_atomic(args.out / "training.json", log)
    state_path.unlink(missing_ok=True)
    print(f"wrote {args.out} ({log['seconds'] / 60:.1f} min of training)")
    return args.out


if __name__ == "__main__":
    main()
