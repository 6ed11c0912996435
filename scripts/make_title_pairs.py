#!/usr/bin/env python3
"""Make a training pairs file (ragd F-058 JSONL layout) from a BEIR corpus: each section's
title is the query, its text the positive, and the text of a random other section of the same
document the negative. Sections whose id starts with --exclude-prefix are skipped (for debfaq,
`faq/` keeps the judged FAQ sections out of training).

    python scripts/make_title_pairs.py ../shared/data/debfaq/corpus.jsonl pairs.jsonl --exclude-prefix faq/
"""
import argparse
import json
import random


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("out")
    ap.add_argument("--exclude-prefix", default="")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    docs = [json.loads(l) for l in open(a.corpus, encoding="utf-8") if l.strip()]
    docs = [d for d in docs if d.get("title") and d.get("text")]
    if a.exclude_prefix:
        docs = [d for d in docs if not d["_id"].startswith(a.exclude_prefix)]
    with open(a.out, "w", encoding="utf-8") as f:
        for d in docs:
            others = [o for o in docs if o["_id"].split("#")[0] == d["_id"].split("#")[0] and o is not d]
            neg = rng.choice(others) if others else rng.choice([o for o in docs if o is not d])
            f.write(json.dumps({
                "query": d["title"],
                "positive": d["text"],
                "positive_id": d["_id"],
                "negatives": [{"id": neg["_id"], "text": neg["text"]}],
                "source_document": d["_id"].split("#")[0],
            }) + "\n")
    print(f"wrote {len(docs)} pairs to {a.out}")


if __name__ == "__main__":
    main()
