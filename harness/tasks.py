"""The synthetic visual-question task: a deterministic generator, its scoring, and its lmms-eval data file.

Each scene is drawn from a seed with PIL only: a 336x336 image of 3-6 objects (shape, colour, size, position; no two
alike in shape, colour and size) and 1-2 short printed words. Every question has a one-word answer and falls into one
of five categories, in equal numbers, that need different visual evidence:
- `color`: the colour of a named object (one object's patches);
- `count`: how many objects of a colour or a shape (evidence scattered over the image);
- `exist`: whether an object of a colour and shape is present (anywhere, possibly small);
- `relation`: whether one object is left of / above another (two objects and their positions);
- `read`: the printed word (small text, a few patches).
Small objects and words cover few of the 576 patches, so pruning to 64 tokens should hurt `read`, `count` and the
small-object questions most. The test split ships as `tasks/synthetic_vqa/test.parquet` (`python -m harness.tasks`
rebuilds it) and runs through lmms-eval like every other task.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = 336
BACKGROUND = (245, 245, 240)
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 180), "orange": (240, 140, 30)}
SHAPES = ("square", "circle", "triangle")
SIZES = {"small": (26, 36), "large": (62, 84)}  # side lengths in pixels: about 2x2 and 5x5 patches of 14 px
WORDS = ("cat", "dog", "sun", "box", "car", "hat", "pen", "cup")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
CATEGORIES = ("color", "count", "exist", "relation", "read")


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def name(self, with_size: bool = False) -> str:
        return f"{self.size + ' ' if with_size else ''}{self.color} {self.shape}"


@dataclass
class Sample:
    id: str
    image: Image.Image | None
    question: str
    answer: str
    category: str


def normalize(text: str) -> str:
    """Lower-case first word, punctuation stripped: the answer of a one-word question."""
    words = re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
    return words[0] if words else ""


def score(output: str, answer: str) -> float:
    return float(normalize(output) == normalize(answer))


def _free_box(rng: random.Random, side_w: int, side_h: int, taken: list[tuple[int, int, int, int]]):
    """A box of the given size that keeps 8 px away from every taken box, or None after 200 tries."""
    for _ in range(200):
        x0, y0 = rng.randint(8, SIZE - side_w - 8), rng.randint(8, SIZE - side_h - 8)
        box = (x0, y0, x0 + side_w, y0 + side_h)
        if all(box[2] + 8 <= t[0] or t[2] + 8 <= box[0] or box[3] + 8 <= t[1] or t[3] + 8 <= box[1] for t in taken):
            return box
    return None


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)


def draw_scene(rng: random.Random, num_words: tuple[int, int] = (1, 2)
               ) -> tuple[Image.Image, list[SceneObject], list[tuple[str, tuple]]]:
    """An image, its objects, and its printed words (`num_words` bounds how many are tried) with their boxes."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    taken: list[tuple[int, int, int, int]] = []
    font = ImageFont.load_default(size=26)
    words = []
    for word in rng.sample(WORDS, rng.randint(*num_words)):
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        box = _free_box(rng, right - left, bottom - top, taken)
        if box is not None:
            draw.text((box[0] - left, box[1] - top), word, fill=(20, 20, 20), font=font)
            taken.append(box)
            words.append((word, box))
    objects: list[SceneObject] = []
    for _ in range(rng.randint(3, 6)):
        shape, color, size = rng.choice(SHAPES), rng.choice(sorted(COLORS)), rng.choice(sorted(SIZES))
        if any((o.shape, o.color, o.size) == (shape, color, size) for o in objects):
            continue
        side = rng.randint(*SIZES[size])
        box = _free_box(rng, side, side, taken)
        if box is None:
            continue
        taken.append(box)
        objects.append(SceneObject(shape, color, size, box))
        draw_shape(draw, shape, box, COLORS[color])
    return image, objects, words


def ask(category: str, objects: list[SceneObject], words: list[tuple[str, tuple]],
        rng: random.Random) -> tuple[str, str, list] | None:
    """A question of `category` about the scene, its one-word answer, and its evidence (the objects and words the
    answer rests on: what a model should look at); None when the scene cannot answer one unambiguously (the caller
    draws another scene)."""
    if category == "color":
        by_shape = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
        by_size = [o for o in objects if sum((p.shape, p.size) == (o.shape, o.size) for p in objects) == 1]
        if not by_shape and not by_size:
            return None
        target = rng.choice(by_shape or by_size)
        named = target.shape if target in by_shape else f"{target.size} {target.shape}"
        return f"What color is the {named}? Answer with one word.", target.color, [target]
    if category == "count":
        if rng.random() < 0.5:
            color = rng.choice(sorted(COLORS))
            counted = [o for o in objects if o.color == color]
            return f"How many {color} objects are there? Answer with a number word.", NUMBERS[len(counted)], counted
        shape = rng.choice(SHAPES)
        counted = [o for o in objects if o.shape == shape]
        return f"How many {shape}s are there? Answer with a number word.", NUMBERS[len(counted)], counted
    if category == "exist":
        if rng.random() < 0.5:  # half the questions name an object that is there
            target = rng.choice(objects)
            shape, color = target.shape, target.color
        else:
            shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
        present = [o for o in objects if o.shape == shape and o.color == color]
        return f"Is there a {color} {shape}? Answer yes or no.", "yes" if present else "no", present
    if category == "relation":
        unique = [o for o in objects if sum((p.color, p.shape) == (o.color, o.shape) for p in objects) == 1]
        if len(unique) < 2:
            return None
        first, second = rng.sample(unique, 2)
        horizontal = rng.random() < 0.5
        axis = 0 if horizontal else 1
        if abs(first.center[axis] - second.center[axis]) < 20:  # too close to call
            return None
        answer = "yes" if first.center[axis] < second.center[axis] else "no"
        relation = "left of" if horizontal else "above"
        return f"Is the {first.name()} {relation} the {second.name()}? Answer yes or no.", answer, [first, second]
    if len(words) == 1:
        return "What word is written in the image? Answer with the word.", words[0][0], words
    (word_a, box_a), (word_b, box_b) = words
    dx, dy = (box_b[0] + box_b[2] - box_a[0] - box_a[2]) / 2, (box_b[1] + box_b[3] - box_a[1] - box_a[3]) / 2
    if abs(dx) >= abs(dy):
        side = rng.choice(("left", "right"))
        word = word_a if (dx > 0) == (side == "left") else word_b
        return f"Which word is written further {side}? Answer with the word.", word, words
    side = rng.choice(("higher", "lower"))
    word = word_a if (dy > 0) == (side == "higher") else word_b
    return f"Which word is written {side} in the image? Answer with the word.", word, words


def synthetic_samples(num_samples: int, seed: int) -> list[Sample]:
    """`num_samples` questions, the categories in turn, each on its own scene; the same seed gives the same data."""
    rng = random.Random(seed)
    samples = []
    for i in range(num_samples):
        category = CATEGORIES[i % len(CATEGORIES)]
        asked = None
        while asked is None:
            image, objects, words = draw_scene(rng)
            if len(objects) >= 2 and words:
                asked = ask(category, objects, words, rng)
        question, answer, _ = asked
        samples.append(Sample(f"synthetic-{seed}-{i}", image, question, answer, category))
    return samples


def write_parquet(samples: list[Sample], path: Path) -> None:
    """The lmms-eval data file of a task: one row per question, the image as PNG bytes."""
    import datasets

    features = datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "category": datasets.Value("string")})
    rows = {"question_id": [s.id for s in samples], "image": [s.image for s in samples],
            "question": [s.question for s in samples], "answer": [s.answer for s in samples],
            "category": [s.category for s in samples]}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))


if __name__ == "__main__":  # python -m harness.tasks: rebuild tasks/synthetic_vqa/test.parquet
    import argparse

    parser = argparse.ArgumentParser(description="Write the synthetic task's test split (deterministic).")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tasks" / "synthetic_vqa"
                        / "test.parquet")
    args = parser.parse_args()
    write_parquet(synthetic_samples(args.num_samples, args.seed), args.out)
    print(f"wrote {args.num_samples} questions to {args.out}")
