"""Train a tiny LLaVA-1.5 model on the synthetic task: `python -m harness.train_tiny`.

The model has LLaVA-1.5's geometry and classes (`LlavaForConditionalGeneration`: a CLIP vision tower at 336 px /
patch 14 -> 576 vision tokens, features from its second-to-last layer, a two-layer MLP projector, a Llama language
model) at tiny widths, so that it trains on a 2-core CPU. Everything is trained from scratch, end to end, on scenes
that `harness.tasks` draws on the fly (never the shipped test split): each scene is one vicuna_v1 conversation with a
question of every category, the first turn exactly the prompt the harness evaluates. Only answer tokens are scored.

Deterministic from `--seed`: the weights are initialised from it and step `s` always trains on the same scenes, so a
resumed run (the state is saved every `--save-every` steps; rerun the same command) equals an uninterrupted one. The
result is a `from_pretrained` checkpoint (safetensors, config, tokenizer, processor) that the harness loads like a
downloaded one (`model.path=<out>`), plus `training.json` (settings, loss curve, validation accuracy per category).
No trained model ships yet: run with these defaults on a 2-core CPU, the model had learned only the answer priors
after 300 steps (README, "Training the tiny model").
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from harness.evaluate import ROOT
from harness.models import TOKENIZER_SPECIALS, build_tiny, fast_tokenizer, vicuna_v1_prompt
from harness.results import write_json_atomic
from harness.tasks import CATEGORIES, ask, draw_scene, score, synthetic_samples

ARCHITECTURE = dict(  # LLaVA-1.5 geometry; widths small enough for a CPU, depth enough for layer-wise dynamics
    name="tiny_trained", source="tiny", image_size=336, patch_size=14, num_vision_tokens=576,
    num_layers=8, hidden_size=128, intermediate_size=384, num_heads=4, num_kv_heads=4,
    vision_hidden_size=96, vision_layers=3, attn_implementation="sdpa",
)
VOCAB_SIZE = 512
VALIDATION_SEED = 2  # the shipped test split is seed 1; training scenes come from their own string-seeded streams
IGNORE = -100
DEFINING = ("seed", "steps", "batch_size", "lr", "warmup")  # settings a resumed run must share


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


def scene_conversation(rng: random.Random):
    """A scene and one question of every category it can answer, in random order: [(category, question, answer)]."""
    while True:
        image, objects, words = draw_scene(rng)
        if len(objects) < 2 or not words:
            continue
        turns = [(category, *asked) for category in CATEGORIES if (asked := ask(category, objects, words, rng))]
        rng.shuffle(turns)
        return image, turns


def encode(processor, image, turns) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, pixel_values and labels of one conversation: the vicuna_v1 prompt (image expanded to its 576 tokens)
    then `answer</s>USER: question ASSISTANT:` per later turn; only answers and their `</s>` are labelled."""
    tokenizer = processor.tokenizer
    first = processor(images=[image], text=[vicuna_v1_prompt(turns[0][1])], return_tensors="pt")
    ids, labels = first["input_ids"][0].tolist(), [IGNORE] * first["input_ids"].shape[1]
    for index, (_, _, answer) in enumerate(turns):
        answer_ids = tokenizer(f" {answer}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += answer_ids
        labels += answer_ids
        if index + 1 < len(turns):
            question_ids = tokenizer(f"USER: {turns[index + 1][1]} ASSISTANT:", add_special_tokens=False)["input_ids"]
            ids += question_ids
            labels += [IGNORE] * len(question_ids)
    return torch.tensor(ids), first["pixel_values"][0], torch.tensor(labels)


def training_batch(processor, seed: int, step: int, batch_size: int) -> dict[str, torch.Tensor]:
    """The scenes of step `step`, right-padded: the same for every run with this seed, resumed or not."""
    rng = random.Random(f"train-{seed}-{step}")
    encoded = [encode(processor, *scene_conversation(rng)) for _ in range(batch_size)]
    length = max(len(ids) for ids, _, _ in encoded)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.full((batch_size, length), pad)
    labels = torch.full((batch_size, length), IGNORE)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    for row, (ids, _, row_labels) in enumerate(encoded):
        input_ids[row, : len(ids)], labels[row, : len(ids)], attention_mask[row, : len(ids)] = ids, row_labels, 1
    pixel_values = torch.stack([pixels for _, pixels, _ in encoded])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, "labels": labels}


def learning_rate(step: int, args) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


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
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch-size", type=int, default=16, help="scenes per step (each with ~5 questions)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=25, help="steps between saves of the training state")
    parser.add_argument("--validate-every", type=int, default=150, help="steps between validation runs (0: end only)")
    parser.add_argument("--validation-samples", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    state_path = args.state or args.out.with_name(args.out.name + ".train-state.pt")

    tokenizer = train_tokenizer(args.seed)
    model, processor = build_tiny(OmegaConf.create({**ARCHITECTURE, "seed": args.seed}), tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    log: dict = {"settings": {**vars(args), "out": str(args.out), "state": str(state_path)},
                 "architecture": ARCHITECTURE, "loss": [], "validation": [], "seconds": 0.0}
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        saved = state["log"]["settings"]
        differ = [key for key in DEFINING if saved[key] != getattr(args, key)]
        if differ:
            raise SystemExit(f"{state_path} belongs to another run ({', '.join(differ)} differ); delete it to start "
                             "afresh")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, log = state["step"], state["log"]
        print(f"resuming from step {start} ({state_path})")
    model.train()
    began = time.monotonic() - log["seconds"]
    with tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train_tiny", unit="step") as bar:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            loss = model(**training_batch(processor, args.seed, step, args.batch_size)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log["loss"].append(round(loss.item(), 5))
            bar.set_postfix(loss=f"{sum(log['loss'][-20:]) / len(log['loss'][-20:]):.3f}")
            done = step + 1
            if args.validate_every and done % args.validate_every == 0 and done < args.steps:
                log["validation"].append({"step": done, **validate(model, processor, args.validation_samples)})
                bar.write(f"step {done}: validation {json.dumps(log['validation'][-1])}")
            if done % args.save_every == 0 or done == args.steps:
                log["seconds"] = time.monotonic() - began
                torch.save({"step": done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "log": log}, state_path.with_suffix(".tmp"))
                state_path.with_suffix(".tmp").replace(state_path)

    log["validation"].append({"step": args.steps, **validate(model, processor, args.validation_samples)})
    print(f"validation accuracy after {args.steps} steps: {json.dumps(log['validation'][-1])}")
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
