"""lmms-eval hooks of the synthetic task: the image, the question, and normalised exact match."""

from harness.tasks import score


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": score(results[0], doc["answer"])}
