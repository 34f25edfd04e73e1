"""Small fabricated copies of the hub tasks' datasets, laid out as their Hugging Face repositories keep them.

Each copy has the real dataset's configs, split files and the columns that lmms-eval's task code reads (with their
Hugging Face feature types: images are `datasets.Image`, stored in parquet as the library stores them), three rows of
invented content and tiny solid-colour images. `PROMPTS` holds the first two documents' questions as lmms-eval's default
(LLaVA) prompts ask them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, Features, Image, Sequence, Value
from PIL import Image as PILImage

YES_NO = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def image(index: int) -> PILImage.Image:
    return PILImage.new("RGB", (24, 16), ((60 * index) % 256, 120, 200))


def write(root: Path, relative: str, rows: list[dict], features: dict) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {name: [row[name] for row in rows] for name in features}
    Dataset.from_dict(columns, features=Features(features)).to_parquet(str(path))


def gqa(root: Path) -> None:
    questions = [("What color is the car?", "red", "img1"), ("Is the sky blue?", "yes", "img2"),
                 ("What is on the table?", "cup", "img1")]
    write(root, "testdev_balanced_instructions/testdev-00000-of-00001.parquet",
          [{"id": str(201307251 + i), "imageId": image_id, "question": q, "answer": a, "fullAnswer": f"It is {a}.",
            "isBalanced": True} for i, (q, a, image_id) in enumerate(questions)],
          {"id": Value("string"), "imageId": Value("string"), "question": Value("string"), "answer": Value("string"),
           "fullAnswer": Value("string"), "isBalanced": Value("bool")})
    # The images config lists images in another order than the questions use them, as the real one does.
    write(root, "testdev_balanced_images/testdev-00000-of-00001.parquet",
          [{"id": f"img{i}", "image": image(i)} for i in (2, 0, 1)], {"id": Value("string"), "image": Image()})


def mme(root: Path) -> None:
    # MME asks two questions of each image (one answered yes, one no); its score needs both.
    rows = [("existence/000000006040.jpg", "Is there a train in this image? Please answer yes or no.", "Yes",
             "existence"),
            ("existence/000000006040.jpg", "Is there a bed in this image? Please answer yes or no.", "No",
             "existence"),
            ("code_reasoning/0020.png", "Is a c++ code shown in the picture? Please answer yes or no.", "Yes",
             "code_reasoning")]
    write(root, "data/test-00000-of-00004.parquet",
          [{"question_id": qid, "image": image(i), "question": q, "answer": a, "category": c}
           for i, (qid, q, a, c) in enumerate(rows)],
          {"question_id": Value("string"), "image": Image(), "question": Value("string"), "answer": Value("string"),
           "category": Value("string")})


def textvqa(root: Path) -> None:
    rows = [("what brand is the drink?", ["coke"] * 7 + ["coca cola"] * 3),
            ("what number is on the shirt?", ["23"] * 10), ("what does the sign say?", ["stop"] * 10)]
    write(root, "data/validation-00000-of-00003.parquet",
          [{"image_id": f"{i:016x}", "question_id": 34602 + i, "question": q, "image": image(i), "answers": answers,
            "ocr_tokens": ["coke", "23"], "set_name": "val"} for i, (q, answers) in enumerate(rows)],
          {"image_id": Value("string"), "question_id": Value("int64"), "question": Value("string"), "image": Image(),
           "answers": Sequence(Value("string")), "ocr_tokens": Sequence(Value("string")),
           "set_name": Value("string")})


def pope(root: Path) -> None:
    rows = [("Is there a snowboard in the image?", "yes", "adversarial"),
            ("Is there a dog in the image?", "no", "popular"), ("Is there a person in the image?", "yes", "random")]
    write(root, "data/test-00000-of-00003.parquet",
          [{"id": str(i), "question_id": str(i + 1), "question": q, "answer": a,
            "image_source": f"COCO_val2014_{i:012d}", "image": image(i), "category": c}
           for i, (q, a, c) in enumerate(rows)],
          {"id": Value("string"), "question_id": Value("string"), "question": Value("string"),
           "answer": Value("string"), "image_source": Value("string"), "image": Image(), "category": Value("string")})


def mmbench_en(root: Path) -> None:
    # Missing hints and options are nulls in the real files (MMBench questions have two to four options).
    rows = [(0, "Which of these is a fruit?", None, ("apple", "chair", "car", None), "A"),
            (1, "What is the man holding?", "The photo was taken at noon.", ("a cup", "a book", "a phone", "a pen"),
             "C"),
            (2, "Which season is it?", None, ("summer", "winter", None, None), "B")]
    write(root, "en/dev-00000-of-00001.parquet",
          [{"index": index, "question": q, "hint": hint, "A": o[0], "B": o[1], "C": o[2], "D": o[3], "answer": a,
            "category": "object_localization", "image": image(index), "source": "invented",
            "L2-category": "finegrained_perception (instance-level)", "comment": None, "split": "dev"}
           for index, q, hint, o, a in rows],
          {"index": Value("int64"), "question": Value("string"), "hint": Value("string"), "A": Value("string"),
           "B": Value("string"), "C": Value("string"), "D": Value("string"), "answer": Value("string"),
           "category": Value("string"), "image": Image(), "source": Value("string"), "L2-category": Value("string"),
           "comment": Value("string"), "split": Value("string")})


def scienceqa_img(root: Path) -> None:
    rows = [("Which animal's feet are also adapted for swimming?", ["duck", "tiger"], 0, "Figure: lake."),
            ("Which state is highlighted?", ["Ohio", "Utah", "Iowa"], 2, ""),
            ("What is the capital of Texas?", ["Austin", "Dallas"], 0, "")]
    write(root, "ScienceQA-IMG/test-00000-of-00001.parquet",
          [{"image": image(i), "question": q, "choices": choices, "answer": answer, "hint": hint,
            "task": "closed choice", "grade": "grade4", "subject": "natural science", "topic": "biology",
            "category": "Adaptations", "skill": "Animal adaptations", "lecture": "", "solution": ""}
           for i, (q, choices, answer, hint) in enumerate(rows)],
          {"image": Image(), "question": Value("string"), "choices": Sequence(Value("string")),
           "answer": Value("int8"), "hint": Value("string"), "task": Value("string"), "grade": Value("string"),
           "subject": Value("string"), "topic": Value("string"), "category": Value("string"),
           "skill": Value("string"), "lecture": Value("string"), "solution": Value("string")})


def mmstar(root: Path) -> None:
    # MMStar's questions carry their options; its files sit at the repository root.
    rows = [("Which option describes the image best?\nOptions: A: a cat, B: a dog, C: a bird, D: a fish", "B",
             "coarse perception", "image scene and topic"),
            ("How many apples are there?\nOptions: A: 1, B: 2, C: 3, D: 4", "C", "fine-grained perception",
             "object counting"),
            ("What is 2 + 2?\nOptions: A: 3, B: 4, C: 5, D: 6", "B", "math", "numeric commonsense and calculation")]
    write(root, "mmstar.parquet",
          [{"index": i, "question": q, "image": image(i), "answer": a, "category": c, "l2_category": l2}
           for i, (q, a, c, l2) in enumerate(rows)],
          {"index": Value("int64"), "question": Value("string"), "image": Image(), "answer": Value("string"),
           "category": Value("string"), "l2_category": Value("string")})


def vqav2(root: Path) -> None:
    rows = [("What is the man riding?", "skateboard"), ("How many dogs are there?", "2"),
            ("Is it raining?", "no")]
    answer = {"answer": Value("string"), "answer_confidence": Value("string"), "answer_id": Value("int64")}
    write(root, "data/validation-00000-of-00068.parquet",
          [{"question_type": "what", "multiple_choice_answer": a,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)],
            "image_id": 262148 + i, "answer_type": "other", "question_id": 262148000 + i, "question": q,
            "image": image(i)} for i, (q, a) in enumerate(rows)],
          {"question_type": Value("string"), "multiple_choice_answer": Value("string"), "answers": [answer],
           "image_id": Value("int64"), "answer_type": Value("string"), "question_id": Value("int64"),
           "question": Value("string"), "image": Image()})


def seedbench(root: Path) -> None:
    # Image questions hold one image, video questions several frames; LLaVA-1.5's SEED-Bench score is the image part.
    rows = [("image", 1, "How many towels are in the image?", ("One", "Two", "Three", "Four"), "A"),
            ("video", 8, "What action is being performed?", ("Running", "Jumping", "Sitting", "Waving"), "D"),
            ("image", 1, "What is the main color of the wall?", ("White", "Blue", "Green", "Red"), "B")]
    write(root, "data/test-00000-of-00001.parquet",
          [{"answer": a, "choice_a": c[0], "choice_b": c[1], "choice_c": c[2], "choice_d": c[3], "data_id": f"{i}.jpg",
            "data_type": kind, "image": [image(i + k) for k in range(frames)], "question": q,
            "question_id": str(101669 + i), "question_type_id": 1} for i, (kind, frames, q, c, a) in enumerate(rows)],
          {"answer": Value("string"), "choice_a": Value("string"), "choice_b": Value("string"),
           "choice_c": Value("string"), "choice_d": Value("string"), "data_id": Value("string"),
           "data_type": Value("string"), "image": Sequence(Image()), "question": Value("string"),
           "question_id": Value("string"), "question_type_id": Value("int64")})


FABRICATE: dict[str, Callable[[Path], None]] = {
    "gqa": gqa, "mme": mme, "textvqa": textvqa, "pope": pope, "mmbench_en": mmbench_en,
    "scienceqa_img": scienceqa_img, "mmstar": mmstar, "vqav2": vqav2, "seedbench": seedbench,
}

# The first two documents' prompts (the task's text that LLaVA-1.5's conversation template then wraps).
PROMPTS: dict[str, list[str]] = {
    "gqa": ["What color is the car?" + YES_NO, "Is the sky blue?" + YES_NO],
    "mme": ["Is there a train in this image?" + YES_NO, "Is there a bed in this image?" + YES_NO],
    "textvqa": ["What brand is the drink?\nReference OCR token: coke, 23" + YES_NO,
                "What number is on the shirt?\nReference OCR token: coke, 23" + YES_NO],
    "pope": ["Is there a snowboard in the image?" + YES_NO, "Is there a dog in the image?" + YES_NO],
    # lmms-eval's MMBench template: hint, question and options on one line, then an empty line before the instruction.
    "mmbench_en": ["Which of these is a fruit? There are several options:\nA. apple\nB. chair\nC. car\n" + LETTER,
                   "The photo was taken at noon. What is the man holding? There are several options:\nA. a cup\n"
                   "B. a book\nC. a phone\nD. a pen\n" + LETTER],
    "scienceqa_img": ["Context: Figure: lake.\nWhich animal's feet are also adapted for swimming?\nA. duck\nB. tiger"
                      + LETTER, "Which state is highlighted?\nA. Ohio\nB. Utah\nC. Iowa" + LETTER],
    # lmms-eval's MMStar instruction ends without the full stop.
    "mmstar": ["Which option describes the image best?\nOptions: A: a cat, B: a dog, C: a bird, D: a fish"
               + LETTER.rstrip("."),
               "How many apples are there?\nOptions: A: 1, B: 2, C: 3, D: 4" + LETTER.rstrip(".")],
    "vqav2": ["What is the man riding?" + YES_NO, "How many dogs are there?" + YES_NO],
    "seedbench": ["How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four" + LETTER,
                  "What is the main color of the wall?\nA. White\nB. Blue\nC. Green\nD. Red" + LETTER],
}
