"""Write data/easy_vqa.jsonl: easy-vqa test questions for the local lmms-eval tasks beside this file.

    python examples/lmms_eval/easy_vqa/make_data.py [--limit 200] [--seed 0]

Images are referenced by absolute path inside the installed easy-vqa package (nothing is copied).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vtprune.eval.data import load_easy_vqa
from vtprune.eval.scoring import ANSWERS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data" / "easy_vqa.jsonl")
    args = p.parse_args()
    data = load_easy_vqa("test", args.limit, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for q in data.questions:
            f.write(json.dumps({"id": q.index, "image": q.image_path, "question": q.question, "answer": q.answer,
                                "type": q.qtype, "label": ANSWERS.index(q.answer)}) + "\n")  # fmt: skip
    print(f"wrote {len(data.questions)} questions to {args.out}")


if __name__ == "__main__":
    main()
