"""Writes a BEIR-layout test set (shared by the builders in this directory)."""
import json
import os


def write_beir(out_dir, corpus, queries, qrels):
    """corpus: dicts with _id, title, text; queries: dicts with _id, text; qrels: (query id,
    corpus id) pairs, each judged relevant (score 1)."""
    os.makedirs(os.path.join(out_dir, "qrels"), exist_ok=True)
    with open(os.path.join(out_dir, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for d in corpus:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(os.path.join(out_dir, "queries.jsonl"), "w", encoding="utf-8") as f:
        for q in queries:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    with open(os.path.join(out_dir, "qrels", "test.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, c in qrels:
            f.write(f"{q}\t{c}\t1\n")
