"""The synthetic visual-question task: a deterministic generator, its scoring, and its lmms-eval data file.

Scenes are drawn deterministically from a seed: 336x336 images of a few coloured shapes, with one-word questions
about them (the colour of a named shape, whether a shape is present, how many shapes there are). The test split
ships as `tasks/synthetic_vqa/test.parquet` (`python -m harness.tasks` rebuilds it) and runs through lmms-eval like
every other task.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 60, 180), "orange": (240, 140, 30)}
SHAPES = ("square", "circle", "triangle")
NUMBERS = ("zero", "one", "two", "three")


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


def _scene(rng: random.Random) -> tuple[Image.Image, list[tuple[str, str]]]:
    image = Image.new("RGB", (336, 336), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    count = rng.randint(1, 3)
    shapes = rng.sample(SHAPES, count)
    colors = rng.sample(sorted(COLORS), count)
    for i, (shape, color) in enumerate(zip(shapes, colors, strict=True)):
        size = rng.randint(40, 90)
        x0 = 10 + i * 110 + rng.randint(0, 100 - min(size, 100) // 2)
        y0 = rng.randint(10, 336 - size - 10)
        box = (x0, y0, min(x0 + size, 330), y0 + size)
        fill = COLORS[color]
        if shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    return image, list(zip(shapes, colors, strict=True))


def synthetic_samples(num_samples: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for i in range(num_samples):
        image, objects = _scene(rng)
        kind = ("color", "exist", "count")[i % 3]
        if kind == "color":
            shape, color = rng.choice(objects)
            question, answer = f"What color is the {shape}? Answer with one word.", color
        elif kind == "exist":
            shape = rng.choice(SHAPES)
            present = any(s == shape for s, _ in objects)
            question, answer = f"Is there a {shape}? Answer yes or no.", "yes" if present else "no"
        else:
            question, answer = "How many shapes are there? Answer with one word.", NUMBERS[len(objects)]
        samples.append(Sample(f"synthetic-{seed}-{i}", image, question, answer, kind))
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
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tasks" / "synthetic_vqa"
                        / "test.parquet")
    args = parser.parse_args()
    write_parquet(synthetic_samples(args.num_samples, args.seed), args.out)
    print(f"wrote {args.num_samples} questions to {args.out}")
