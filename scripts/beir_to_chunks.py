#!/usr/bin/env python3
"""Writes a BEIR test set's corpus as a ragd chunk export, so the pipeline trains on exactly the
sections the questions are judged against (one chunk per section, ids kept):

    python3 scripts/beir_to_chunks.py SET_DIR OUT_DIR    # writes OUT_DIR/chunks.jsonl

Each line is {"id", "text", "metadata": {"document_id"}}; the document is the section id without
its trailing section number (`perlfaq4-30` -> `perlfaq4`, `faq/ch-basic.en.html#2` ->
`faq/ch-basic.en.html`), so the held-out split keeps a page's sections together.
"""
import json
import os
import re
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    n = 0
    with open(os.path.join(src, "corpus.jsonl"), encoding="utf-8") as f, open(
        os.path.join(out, "chunks.jsonl"), "w", encoding="utf-8"
    ) as o:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            doc = re.sub(r"[#-]\d+$", "", d["_id"])
            chunk = {"id": d["_id"], "text": d["text"], "metadata": {"document_id": doc}}
            o.write(json.dumps(chunk, ensure_ascii=False) + "\n")
            n += 1
    print(f"{out}/chunks.jsonl: {n} chunks")


if __name__ == "__main__":
    main()
