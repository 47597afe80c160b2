"""Document functions of the local easy-vqa tasks (lmms-eval loads them by ``!function utils.NAME``)."""

from PIL import Image

from vtprune.eval.scoring import ANSWERS, normalize_answer


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return list(ANSWERS)


def process_results(doc, results):
    """easy-vqa's scoring: the first answer word of the reply against the gold answer."""
    return {"exact_match": float(normalize_answer(results[0]) == doc["answer"])}
