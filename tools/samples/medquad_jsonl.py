"""Draw the shipped MedQuAD JSONL samples from a full MedQuAD checkout (run once by a maintainer).

    python tools/samples/medquad_jsonl.py PATH/TO/MedQuAD meddistill/samples/medquad_qa

Reads every XML pair with MedQuAD's own loader (`medquad:` format), keeps pairs whose answer has
40-600 characters (an answer that fits a 320-token example whole, end of sequence included, teaches
a small model to stop; long PDQ summaries cut at the budget teach it to ramble), then splits *by document* so no held-out question shares a document
(same disease page) with a training one: a seeded shuffle of documents, held-out documents first
until 200 pairs, training documents until 600. Records keep their upstream ids and text; only the
container changes (XML -> the generic `jsonl` MedicalRecord format).
"""
from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from pathlib import Path

from meddistill.data import load_dataset

SEED, HELDOUT, TRAIN = 20261130, 200, 600


def main(src: str, out: str) -> None:
    records = [r for r in load_dataset(f"medquad:{src}").records if r.answer and 40 <= len(r.answer) <= 600]
    by_doc = defaultdict(list)
    for r in records:
        by_doc[(r.meta.get("document_source"), r.meta.get("document_id"))].append(r)
    docs = sorted(by_doc)
    random.Random(SEED).shuffle(docs)
    picked = {"heldout200": [], "train600": []}
    for doc in docs:
        name = "heldout200" if len(picked["heldout200"]) < HELDOUT else "train600"
        room = (HELDOUT if name == "heldout200" else TRAIN) - len(picked[name])
        if room <= 0:
            break
        picked[name] += by_doc[doc][:room]
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    for name, rows in picked.items():
        path = target / f"medquad.{name}.jsonl"
        path.write_text("".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} records from {len({(r.meta.get('document_source'), r.meta.get('document_id')) for r in rows})} documents")


if __name__ == "__main__":
    main(*sys.argv[1:3])
