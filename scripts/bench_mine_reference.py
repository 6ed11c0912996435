#!/usr/bin/env python3
"""Reference for the mining benchmark: sentence-transformers' mine_hard_negatives on the same
model, queries, positives and corpus as `cargo run --example bench_mine`, with the same
settings (num_negatives 5, relative_margin 0.05, sampling top, exact search, batch 32).

Usage: bench_mine_reference.py MODEL_DIR DATA.json --threads N
DATA.json: {"queries": [...], "positives": [...], "corpus": [...]}.
Prints one JSON line last: seconds (embedding + search), rows kept, and per query the mined
negatives (null where a query got too few and the n-tuple output drops its row)."""
import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--negatives", type=int, default=5)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    data = json.load(open(args.data))
    model = SentenceTransformer(args.model, device="cpu")
    dataset = Dataset.from_dict({"query": data["queries"], "positive": data["positives"]})
    # Warm-up outside the timing, as the Rust side loads its model outside it too.
    model.encode(data["corpus"][:32], batch_size=32)
    start = time.perf_counter()
    mined = mine_hard_negatives(
        dataset,
        model,
        corpus=data["corpus"],
        num_negatives=args.negatives,
        relative_margin=0.05,
        sampling_strategy="top",
        output_format="n-tuple",
        batch_size=32,
        use_faiss=False,
        verbose=False,
    )
    seconds = time.perf_counter() - start
    by_query = {}
    for row in mined:
        by_query[row["query"]] = [row[f"negative_{i + 1}"] for i in range(args.negatives)]
    negatives = [by_query.get(q) for q in data["queries"]]
    print(json.dumps({"seconds": seconds, "rows": len(mined), "negatives": negatives}))


if __name__ == "__main__":
    main()
