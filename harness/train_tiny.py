"""Train a tiny LLaVA-1.5 model on the synthetic task: `python -m harness.train_tiny`.

The model has LLaVA-1.5's geometry and classes (`LlavaForConditionalGeneration`: a CLIP vision tower at 336 px /
patch 14 -> 576 vision tokens, features from its second-to-last layer, a two-layer MLP projector, a Llama language
model) at tiny widths, so that it trains on a 2-core CPU. Everything is trained from scratch on scenes that
`harness.tasks` draws on the fly (never the shipped test split), in two stages, as LLaVA starts from a vision tower
that already sees:
1. seeing (`--vision-steps`): the vision tower alone, with a linear read-out of every patch's colour, shape, size,
   word, row, column and whether it holds an item's centre (targets from the scene's geometry), and of the CLS token
   at the feature layer, which says which colours, shapes, objects and words the scene holds (`--cls-weight`): the
   CLS attention that VisionZip, VisPruner, HoloV and PruMerge rank patches by then looks at the scene's content;
2. answering (`--steps`): the tower frozen, the projector (its first layer started as stage 1's read-out) and the
   language model learn the questions, each exactly the prompt the harness evaluates. A pool of scenes holds the
   tower's features (a few replaced every step), and each scene's questions share one computation of the prompt up
   to the image (`training_batch`). Besides the answer, every question token is asked for the answer too (an
   "early answer": the token that names the object can look it up in one hop). The image enters first as one token
   per item, the patch at its centre (`--centre-steps`), then the item's other tokens and a share of the plain
   background come in (`--ramp-steps`, `--background-kept`; positions always kept; `image_tokens_kept`). From then
   on a kept token drawn with probability p weighs 1/p as an attention key (`--reweight`, on by default), so that
   attention sums over the image as if all 576 tokens were there; `--full-steps` (0 by default) ends on all 576.
   `--device auto` trains on a GPU when there is one; `--part-size` runs each step in parts of rows of similar
   length (the same step up to rounding, with less padding); `--previous-weight` also asks the first layer's output
   at each question token for the token before it (of the questions that name an object: `--previous-categories`).

Deterministic from `--seed`: the weights are initialised from it and step `s` always trains on the same scenes, so a
resumed run (the state is saved every `--save-every` steps; rerun the same command) equals an uninterrupted one. The
result is a `from_pretrained` checkpoint (safetensors, config, tokenizer, processor) that the harness loads like a
downloaded one (`model=tiny_trained`, or `model.path=<out>`), plus `training.json` (settings, losses, validation
accuracy per category). The shipped `checkpoints/tiny_trained` was made by the defaults with `--seed 0`
(docs/tiny-model.md has its measured accuracy).
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
from harness.models import TOKENIZER_SPECIALS, build_tiny, fast_tokenizer, resolve_device, vicuna_v1_prompt
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
# Settings a resumed run must share: those of stage 1 always, those of stage 2 once it has begun (so stage 2 can be
# rerun with other settings from a finished stage 1).
STAGE1_SETTINGS = ("seed", "vision_steps", "vision_batch_size", "vision_lr", "warmup", "cls_weight")
STAGE2_SETTINGS = ("steps", "batch_size", "rounds", "lr", "pool", "refresh", "early_weight", "centre_steps",
                   "ramp_steps", "background_kept", "full_steps", "reweight", "part_size", "previous_weight",
                   "previous_categories")


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
# The CLS token's multi-label read-out: which colours, shapes, objects (colour, shape, size) and words a scene holds.
# Naming each object asks the CLS token to find every one of them, small ones included.
SCENE_LABELS = ([("color", c) for c in sorted(COLORS)] + [("shape", s) for s in SHAPES]
                + [("object", (c, s, z)) for c in sorted(COLORS) for s in SHAPES for z in sorted(SIZES)]
                + [("word", w) for w in WORDS])
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


def centre_patches(objects, words) -> list[int]:
    """The patch that holds each item's centre (words, then objects): one patch per item."""
    return [int((box[1] + box[3]) / 2 // PATCH) * PATCHES_PER_SIDE + int((box[0] + box[2]) / 2 // PATCH)
            for box in [box for _, box in words] + [item.box for item in objects]]


def patch_targets(objects, words) -> dict[str, torch.Tensor]:
    """The VISION_TARGETS of a scene's 576 patches: each patch labelled by the item covering most of it."""
    dominant = item_map(objects, words)
    side = PATCHES_PER_SIDE
    targets = {name: torch.zeros(side * side, dtype=torch.long) for name in VISION_TARGETS}
    targets["row"], targets["column"] = torch.arange(side * side) // side, torch.arange(side * side) % side
    colors = sorted(COLORS)
    targets["center"][centre_patches(objects, words)] = 1
    for number, item in enumerate([*words, *objects], start=1):
        on = dominant == number
        if number <= len(words):
            targets["color"][on], targets["word"][on] = len(COLORS) + 1, WORDS.index(item[0]) + 1
        else:
            targets["color"][on] = colors.index(item.color) + 1
            targets["shape"][on], targets["size"][on] = SHAPES.index(item.shape) + 1, sorted(SIZES).index(item.size) + 1
    return targets


def scene_targets(objects, words) -> torch.Tensor:
    """(len(SCENE_LABELS),) 1.0 for each label the scene holds: the CLS token's target."""
    held = ({("color", o.color) for o in objects} | {("shape", o.shape) for o in objects}
            | {("object", (o.color, o.shape, o.size)) for o in objects} | {("word", word) for word, _ in words})
    return torch.tensor([float(label in held) for label in SCENE_LABELS])


def vision_batch(processor, seed: int, step: int, batch_size: int, device: torch.device
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-1 images of step `step` (more words per scene than the task draws: reading is the slowest to learn), their
    patch targets and their scene targets ("scene"), on `device`."""
    rng = random.Random(f"see-{seed}-{step}")
    scenes = [draw_scene(rng, num_words=(2, 4)) for _ in range(batch_size)]
    pixel_values = processor.image_processor([image for image, _, _ in scenes], return_tensors="pt")["pixel_values"]
    targets = [patch_targets(objects, words) for _, objects, words in scenes]
    stacked = {name: torch.stack([t[name] for t in targets]).to(device) for name in VISION_TARGETS}
    stacked["scene"] = torch.stack([scene_targets(objects, words) for _, objects, words in scenes]).to(device)
    return pixel_values.to(device), stacked


def feature_layer_states(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The tower's states at LLaVA's feature layer, CLS first: what the projector reads is `[:, 1:]`."""
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer]


def vision_loss(model, head, cls_head, pixel_values, targets, cls_weight: float
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed cross-entropy of the per-patch targets plus `cls_weight` times the CLS token's multi-label loss, and each
    target's accuracy on the patches it is scored on ("scene": the share of scene labels the CLS gets right)."""
    states = feature_layer_states(model, pixel_values)
    logits = head(states[:, 1:]).split(list(VISION_TARGETS.values()), dim=-1)
    loss, accuracy = 0.0, {}
    for (name, _), scores in zip(VISION_TARGETS.items(), logits, strict=True):
        scored = targets[name] > 0 if name in FOREGROUND_ONLY else torch.ones_like(targets[name], dtype=torch.bool)
        loss = loss + torch.nn.functional.cross_entropy(scores[scored], targets[name][scored])
        accuracy[name] = (scores.argmax(-1) == targets[name])[scored].float().mean().item()
    if cls_weight:
        scene = cls_head(states[:, 0])
        loss = loss + cls_weight * torch.nn.functional.binary_cross_entropy_with_logits(scene, targets["scene"])
        accuracy["scene"] = ((scene > 0) == (targets["scene"] > 0.5)).float().mean().item()
    return loss, accuracy


# Stage 2 ("answering"): the projector and the language model learn the questions; the tower is frozen.
def pool_scene(seed: int, index: int):
    """Scene `index` of stage 2's stream: an image, its objects and its words (as the test split draws them)."""
    rng = random.Random(f"scene-{seed}-{index}")
    while True:
        image, objects, words = draw_scene(rng)
        if len(objects) >= 2 and words:
            return image, objects, words


class ScenePool:
    """`size` scenes with the frozen tower's features, so that a step costs only the language model: step `s`
    holds scenes s*refresh .. s*refresh+size-1 of the stream (scene k in slot k % size), i.e. each step replaces the
    `refresh` oldest. The pool of a step depends on (seed, step) alone, so a resumed run rebuilds it exactly."""

    def __init__(self, model, processor, seed: int, size: int, refresh: int, step: int):
        self.model, self.processor, self.seed, self.size, self.refresh = model, processor, seed, size, refresh
        self.features = torch.zeros(size, PATCHES_PER_SIDE ** 2, model.config.vision_config.hidden_size)
        self.foreground = torch.zeros(size, PATCHES_PER_SIDE ** 2, dtype=torch.bool)
        self.scenes: list = [None] * size
        first = step * refresh
        for begin in tqdm(range(first, first + size, 64), desc="scene pool", unit="x64", leave=False):
            self.draw(range(begin, min(begin + 64, first + size)))
        self.step = step

    @torch.no_grad()
    def draw(self, indices: range) -> None:
        scenes = [pool_scene(self.seed, k) for k in indices]
        pixel_values = self.processor.image_processor([image for image, _, _ in scenes], return_tensors="pt")
        features = feature_layer_states(self.model, pixel_values["pixel_values"].to(self.model.device,
                                                                                     self.model.dtype))[:, 1:]
        for k, (image, objects, words), feature in zip(indices, scenes, features, strict=True):
            slot = k % self.size
            self.features[slot], self.foreground[slot] = feature, foreground_patches(image)
            self.scenes[slot] = (objects, words)

    def advance(self) -> None:
        """To the next step: the `refresh` oldest scenes make way for new ones."""
        first = self.step * self.refresh + self.size
        self.draw(range(first, first + self.refresh))
        self.step += 1


def foreground_patches(image: Image.Image) -> torch.Tensor:
    """Which of the 576 patches show anything but the plain background."""
    return per_patch(torch.tensor((np.asarray(image) != BACKGROUND).any(-1))).any(1)


def prompt_ids(tokenizer, question: str, image_token: int) -> tuple[list[int], list[int]]:
    """The evaluated prompt's token ids before and after its image (which the processor expands to 576 tokens)."""
    ids = tokenizer(vicuna_v1_prompt(question))["input_ids"]
    at = ids.index(image_token)
    return ids[:at], ids[at + 1:]


def training_batch(pool: ScenePool, tokenizer, image_token: int, seed: int, step: int, batch_size: int, rounds: int,
                   object_kept: float, background_kept: float, reweight: bool = False,
                   previous_categories: tuple[str, ...] = CATEGORIES) -> dict[str, torch.Tensor]:
    """Stage 2's batch of step `step`: one row per scene of the pool (drawn without replacement), laid out as a
    shared prefix (the prompt up to and including the image) followed by several question branches, up to `rounds`
    questions of each category, each `question ASSISTANT: answer</s>` exactly as the evaluated prompt continues.
    A branch attends to the prefix and to itself only, at the positions of the evaluated prompt, so it is that prompt
    computed once for all its questions. The image token at each item's centre always enters; the other image
    tokens that show an item enter with probability `object_kept`, those of plain background with probability
    `background_kept` (original positions kept: a shorter sequence that looks the same to rotary attention). With
    `reweight`, each kept token that was drawn with probability p weighs 1/p as an attention key (`key_bias`
    log(1/p) on its attention logits), so that every softmax sums over the image as if all of it were there: each
    kept background token stands for the ones dropped beside it (an importance-weighted, Horvitz-Thompson sum).

    Returns right-padded `input_ids`, `position_ids`, `segments` (0: prefix, j: branch j, -1: padding), `key_bias`
    (0 but on reweighted image tokens), `labels`
    (the next token, at the position that predicts it; -100 elsewhere), `early_labels` (the answer's first token at
    every question token after the branch's newline but the last, which `labels` covers), `previous_labels` (at those
    tokens of the questions in `previous_categories`, the token before each), `features` (the kept image
    tokens' tower features, in row order) and `slots` (each row's scene in the pool)."""
    rng = random.Random(f"train-{seed}-{step}")
    prefix = prompt_ids(tokenizer, "", image_token)[0]  # the same for every question
    rows, slots = [], rng.sample(range(pool.size), batch_size)
    for slot in slots:
        objects, words = pool.scenes[slot]
        asked: dict[str, tuple[str, str]] = {}  # question -> (answer, category)
        for _ in range(rounds):
            for category in CATEGORIES:
                if found := ask(category, objects, words, rng):
                    asked.setdefault(found[0], (found[1], category))
        drawn = torch.rand(PATCHES_PER_SIDE ** 2, generator=torch.Generator().manual_seed(rng.getrandbits(62)))
        foreground, centre = pool.foreground[slot], torch.zeros_like(pool.foreground[slot])
        centre[centre_patches(objects, words)] = True
        kept_share = torch.where(centre, 1.0, torch.where(foreground, object_kept, background_kept))
        kept = (centre | (drawn < kept_share)).nonzero()[:, 0]
        branches = [(prompt_ids(tokenizer, question, image_token)[1],
                     tokenizer(f" {answer}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
                     category in previous_categories)
                    for question, (answer, category) in asked.items()]
        ids, positions = [*prefix, *[image_token] * len(kept)], [*range(len(prefix)), *(len(prefix) + kept).tolist()]
        segments, (labels, early, previous) = [0] * len(ids), ([IGNORE] * len(ids) for _ in range(3))
        bias = [0.0] * len(prefix) + (-kept_share[kept].log() if reweight else torch.zeros(len(kept))).tolist()
        after_image = len(prefix) + PATCHES_PER_SIDE ** 2
        for branch, (suffix, answer, asks_previous) in enumerate(branches, start=1):
            tokens = suffix + answer
            ids += tokens
            positions += range(after_image, after_image + len(tokens))
            segments += [branch] * len(tokens)
            bias += [0.0] * len(tokens)
            labels += [IGNORE] * (len(suffix) - 1) + answer + [IGNORE]
            early += [IGNORE] + [answer[0]] * (len(suffix) - 2) + [IGNORE] * (len(answer) + 1)
            before = suffix[: len(suffix) - 2] if asks_previous else [IGNORE] * (len(suffix) - 2)
            previous += [IGNORE, *before] + [IGNORE] * (len(answer) + 1)
        rows.append((ids, positions, segments, bias, labels, early, previous, pool.features[slot, kept]))
    length = max(len(ids) for ids, *_ in rows)
    batch = {"input_ids": torch.full((batch_size, length), tokenizer.pad_token_id),
             "position_ids": torch.zeros(batch_size, length, dtype=torch.long),
             "segments": torch.full((batch_size, length), -1), "key_bias": torch.zeros(batch_size, length),
             "labels": torch.full((batch_size, length), IGNORE),
             "early_labels": torch.full((batch_size, length), IGNORE),
             "previous_labels": torch.full((batch_size, length), IGNORE)}
    for row, values in enumerate(rows):
        for key, value in zip(("input_ids", "position_ids", "segments", "key_bias", "labels", "early_labels",
                               "previous_labels"), values[:7], strict=True):
            batch[key][row, : len(value)] = torch.tensor(value)
    batch["features"] = torch.cat([features for *_, features in rows])
    batch["slots"] = torch.tensor(slots)
    return batch


def branch_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) boolean attention mask of a branched batch: causal, every token sees the prefix, a branch sees
    itself, padding sees only itself (so that no row is empty)."""
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool).tril()
    visible = causal & (query >= 0) & ((key == 0) | (key == query))
    return (visible | torch.eye(segments.shape[1], dtype=torch.bool))[:, None]


def input_embeddings(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A `training_batch`'s input embeddings: the text tokens' own, the tower's features projected as LLaVA projects
    them in the image tokens' places."""
    llava, ids = model.model, batch["input_ids"]
    image = llava.multi_modal_projector(batch["features"].to(model.dtype))
    return llava.get_input_embeddings()(ids).masked_scatter((ids == model.config.image_token_id)[..., None], image)


def language_model_states(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The language model's last hidden states (normed) on a `training_batch`, and its first layer's output."""
    mask = branch_mask(batch["segments"])
    if batch["key_bias"].any():  # reweighted keys: an additive mask (a boolean one keeps the plain run bit for bit)
        mask = torch.where(mask, batch["key_bias"][:, None, None, :].to(model.dtype), -math.inf)
    out = model.model.language_model(inputs_embeds=input_embeddings(model, batch), attention_mask=mask,
                                     position_ids=batch["position_ids"], output_hidden_states=True)
    return out.last_hidden_state, out.hidden_states[1]


def batch_parts(batch: dict[str, torch.Tensor], rows: int, image_token: int) -> list[dict[str, torch.Tensor]]:
    """A `training_batch` cut into parts of `rows` rows of similar length (sorted by it), each trimmed to its own
    longest row: the same tokens with less padding, in smaller activations. A step's gradients are its parts' sum
    when each part's losses are divided by the whole batch's label counts (`answer_losses`)."""
    lengths = (batch["segments"] >= 0).sum(1)
    images = (batch["input_ids"] == image_token).sum(1)
    ends = images.cumsum(0)  # each row's image tokens are the `features` rows ends - images .. ends - 1
    parts = []
    for part in lengths.argsort(stable=True).split(rows):
        length = int(lengths[part].max())
        trimmed = {key: value[part, :length] if value.dim() == 2 else value[part]
                   for key, value in batch.items() if key != "features"}
        trimmed["features"] = torch.cat([batch["features"][ends[r] - images[r]: ends[r]] for r in part.tolist()])
        parts.append(trimmed)
    return parts


LABELS = ("labels", "early_labels", "previous_labels")


def label_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """How many answer, early-answer and previous-token labels a batch holds."""
    return tuple(int((batch[key] != IGNORE).sum()) for key in LABELS)


def answer_losses(model, batch: dict[str, torch.Tensor], counts: tuple[int, int, int] | None = None,
                  previous_head: torch.nn.Linear | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of the answers (`labels`), of the early answers (`early_labels`) and, given `previous_head`, of
    the token before each of `previous_labels`' tokens read off the first layer's output; each summed over the
    batch's labels and divided by `counts` (default: the batch's own, i.e. the mean; a part of a batch passes the
    whole batch's, so that its parts' losses add up to the batch's).

    Every question token is also asked for the answer's first token. That loss reaches the token that names the
    object directly: it can look its object up in the image in one attention hop, and each later token can copy from
    the one before it. Without it, only the last token is asked, which must first find the object's name and then
    the object (two hops with no signal until both exist): measured, a plateau at the answer priors
    (docs/tiny-model.md). The previous-token loss asks the first layer to bring each token the one before it, so that
    "square" in "Is there a green square?" can look up green squares, not just squares, from the second layer on."""
    final, first = language_model_states(model, batch)
    heads = ((final, model.lm_head), (final, model.lm_head), (first, previous_head))
    losses = []
    for key, count, (states, head) in zip(LABELS, counts or label_counts(batch), heads, strict=True):
        asked = batch[key] != IGNORE
        losses.append(final.new_zeros(()) if head is None else torch.nn.functional.cross_entropy(
            head(states[asked]), batch[key][asked], reduction="sum") / max(count, 1))
    return tuple(losses)


def start_projector_from(head: torch.nn.Linear, model) -> None:
    """Stage 2 starts the projector's first layer as stage 1's read-out (in its first units), so that the language
    model receives each patch's colour, shape, word and position as separate directions from the first step."""
    first = model.model.multi_modal_projector.linear_1
    with torch.no_grad():
        first.weight[: head.out_features] = head.weight
        first.bias[: head.out_features] = head.bias


def image_tokens_kept(stage_step: int, args) -> tuple[float, float, bool]:
    """Stage 2's share of non-centre item tokens and of background tokens at a step, and whether the kept ones are
    reweighted: none for `--centre-steps` (a step then costs a fraction, and each object is one token to pick among
    a few), rising linearly over `--ramp-steps` to all item tokens and `--background-kept`, and every token in the
    last `--full-steps`. `--reweight` applies once the ramp is done: during it a rare kept token would weigh
    hundreds of tokens, where the ramp is there to bring the image in gradually."""
    if stage_step >= args.steps - args.full_steps:
        return 1.0, 1.0, False
    ramp = min(1.0, max(0, stage_step - args.centre_steps + 1) / max(1, args.ramp_steps))
    return ramp, ramp * args.background_kept, args.reweight and ramp == 1.0


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
        out = model.generate(**inputs.to(model.device), max_new_tokens=4, do_sample=False)
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
    parser.add_argument("--cls-weight", type=float, default=1.0,
                        help="stage 1: weight of the CLS token's read-out of what the scene holds (0: off, as the\n"
                             "model shipped before 2026-12-07 was trained)")
    parser.add_argument("--steps", type=int, default=2250, help="stage 2: steps of projector and language model")
    parser.add_argument("--batch-size", type=int, default=16, help="stage 2: scenes per step")
    parser.add_argument("--rounds", type=int, default=4, help="stage 2: questions of each category per scene, at most")
    parser.add_argument("--lr", type=float, default=1e-3, help="stage 2: peak learning rate")
    parser.add_argument("--warmup", type=int, default=30, help="warm-up steps of each stage")
    parser.add_argument("--pool", type=int, default=1000, help="stage 2: scenes whose tower features are held")
    parser.add_argument("--refresh", type=int, default=4, help="stage 2: pool scenes replaced by new ones each step")
    parser.add_argument("--early-weight", type=float, default=0.5,
                        help="stage 2: weight of the early-answer loss at every question token (0: off)")
    parser.add_argument("--previous-weight", type=float, default=0.02,
                        help="stage 2: weight of a loss that asks the first layer's output at every early-answered\n"
                             "question token for the token before it (0: off; docs/tiny-model.md)")
    parser.add_argument("--previous-categories", nargs="+", choices=CATEGORIES,
                        default=[c for c in CATEGORIES if c != "read"],
                        help="stage 2: the question categories that --previous-weight applies to (default: those\n"
                             "that name an object, i.e. all but read)")
    parser.add_argument("--centre-steps", type=int, default=500,
                        help="stage 2: first steps that see only the image token at each item's centre")
    parser.add_argument("--ramp-steps", type=int, default=200,
                        help="stage 2: steps after those over which the other image tokens come in")
    parser.add_argument("--background-kept", type=float, default=0.1,
                        help="stage 2: share of plain-background image tokens kept, but in the last --full-steps")
    parser.add_argument("--full-steps", type=int, default=0, help="stage 2: final steps on all 576 image tokens")
    parser.add_argument("--reweight", action=argparse.BooleanOptionalAction, default=True,
                        help="stage 2, after the ramp: a kept image token drawn with probability p weighs 1/p as\n"
                             "an attention key, so that attention sums over the image as if all 576 were there")
    parser.add_argument("--part-size", type=int, default=8,
                        help="stage 2: run each step in parts of this many rows of similar length, each padded\n"
                             "only to its own longest (0: the whole batch at once). The same step up to rounding,\n"
                             "about a fifth faster after the ramp on our 2-core CPU (docs/tiny-model.md)")
    parser.add_argument("--save-every", type=int, default=25, help="steps between saves of the training state")
    parser.add_argument("--validate-every", type=int, default=250,
                        help="stage-2 steps between validations (0: at the end only)")
    parser.add_argument("--validation-samples", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one, else the CPU), cpu, cuda, ...")
    args = parser.parse_args(argv)
    if args.batch_size > args.pool:
        parser.error("--batch-size must not exceed --pool (a step draws its scenes from the pool)")
    if args.part_size < 0:
        parser.error("--part-size must be 0 (the whole batch) or a number of rows")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    state_path = args.state or args.out.with_name(args.out.name + ".train-state.pt")
    state_path.parent.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(args.seed)
    model, processor = build_tiny(OmegaConf.create({**ARCHITECTURE, "seed": args.seed}), tokenizer)
    model.to(device)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        head = torch.nn.Linear(model.config.vision_config.hidden_size, sum(VISION_TARGETS.values())).to(device)
        text = model.config.text_config
        previous_head = torch.nn.Linear(text.hidden_size, text.vocab_size).to(device)
        cls_head = torch.nn.Linear(model.config.vision_config.hidden_size, len(SCENE_LABELS)).to(device)
    # One optimiser for both stages: AdamW leaves alone the parameters that a stage gives no gradient.
    heads = torch.nn.ModuleDict({"head": head, "previous_head": previous_head, "cls_head": cls_head})
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    log: dict = {"settings": {**vars(args), "out": str(args.out), "state": str(state_path)},
                 "architecture": ARCHITECTURE, "vision": [], "loss": [], "early_loss": [], "previous_loss": [],
                 "validation": [],
                 "seconds": 0.0}
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False, map_location=device)
        saved = state["log"]["settings"]
        defining = STAGE1_SETTINGS + (STAGE2_SETTINGS if state["step"] > args.vision_steps else ())
        differ = [key for key in defining if saved.get(key) != getattr(args, key)]
        if differ:
            raise SystemExit(f"{state_path} belongs to another run ({', '.join(differ)} differ); delete it to start "
                             "afresh")
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        start, log = state["step"], {**log, **state["log"], "settings": log["settings"]}
        print(f"resuming from step {start} ({state_path})")
    model.train()
    began = time.monotonic() - log["seconds"]
    pool = None  # stage 2's scenes, built when stage 2 starts or resumes
    total = args.vision_steps + args.steps
    with tqdm(range(start, total), initial=start, total=total, desc="train_tiny", unit="step") as bar:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            seeing = step < args.vision_steps
            if seeing:
                loss, accuracy = vision_loss(model, head, cls_head, *vision_batch(processor, args.seed, step,
                                                                                   args.vision_batch_size, device),
                                             cls_weight=args.cls_weight)
                loss.backward()
                loss = loss.item()
                log["vision"].append({"loss": round(loss, 4), **{k: round(v, 3) for k, v in accuracy.items()}})
                bar.set_description(f"train_tiny (seeing: shape {accuracy['shape']:.2f} word {accuracy['word']:.2f} "
                                    f"scene {accuracy.get('scene', float('nan')):.2f})")
            else:
                stage_step = step - args.vision_steps
                if stage_step == 0:
                    start_projector_from(head, model)
                if pool is None:
                    pool = ScenePool(model, processor, args.seed, args.pool, args.refresh, stage_step)
                batch = training_batch(pool, processor.tokenizer, model.config.image_token_id, args.seed, stage_step,
                                       args.batch_size, args.rounds, *image_tokens_kept(stage_step, args),
                                       previous_categories=tuple(args.previous_categories))
                counts, totals = label_counts(batch), [0.0, 0.0, 0.0]
                weights = (1.0, args.early_weight, args.previous_weight)
                parts = batch_parts(batch, args.part_size, model.config.image_token_id) if args.part_size else [batch]
                for part in parts:
                    losses = answer_losses(model, {key: value.to(device) for key, value in part.items()}, counts,
                                           previous_head if args.previous_weight else None)
                    sum(weight * part_loss for weight, part_loss in zip(weights, losses, strict=True)).backward()
                    totals = [total + part_loss.item() for total, part_loss in zip(totals, losses, strict=True)]
                answering, early, previous = totals
                loss = sum(weight * total for weight, total in zip(weights, totals, strict=True))
                log["loss"].append(round(answering, 5))
                log["early_loss"].append(round(early, 5))
                if args.previous_weight:
                    log["previous_loss"].append(round(previous, 5))
                bar.set_description("train_tiny (answering)")
            trained = [p for p in [*model.parameters(), *heads.parameters()] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not seeing and step + 1 < total:  # the last step draws no scenes it would not use
                pool.advance()
            bar.set_postfix(loss=f"{loss:.3f}")
            done = step + 1
            if (not seeing and args.validate_every and (done - args.vision_steps) % args.validate_every == 0
                    and done < total):
                log["validation"].append({"step": done, **validate(model, processor, args.validation_samples)})
                bar.write(f"step {done}: validation {json.dumps(log['validation'][-1])}")
            if done % args.save_every == 0 or done == total:
                log["seconds"] = time.monotonic() - began
                torch.save({"step": done, "model": model.state_dict(), "heads": heads.state_dict(),
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
