#!/usr/bin/env python3
"""Load a reranker directory exported by `ragd-worker train-reranker` (or a job) with
sentence-transformers' CrossEncoder and compare its scores with the Rust engine's.

Usage:
    ragd-worker rerank --model DIR --query "..." --docs docs.txt --json > rust.json
    HF_HUB_OFFLINE=1 python scripts/compare_reranker.py DIR rust.json

rust.json is what `ragd-worker rerank --json` prints: {"query", "results": [{"index", "score",
"logit", "text"}]}. Prints the max abs difference of logits and of scores and whether both
rank the documents in the same order; exits 1 when a difference exceeds 1e-4.
"""
import json
import sys

import numpy as np
import torch
from sentence_transformers import CrossEncoder


def main() -> None:
    model_dir, rust_json = sys.argv[1], sys.argv[2]
    with open(rust_json, encoding="utf-8") as f:
        data = json.load(f)
    results = data["results"]
    pairs = [(data["query"], r["text"]) for r in results]
    model = CrossEncoder(model_dir, device="cpu")
    logits = model.predict(pairs, batch_size=16, activation_fn=torch.nn.Identity())
    scores = model.predict(pairs, batch_size=16)
    rust_logits = np.asarray([r["logit"] for r in results], dtype=np.float32)
    rust_scores = np.asarray([r["score"] for r in results], dtype=np.float32)
    dl = float(np.abs(logits - rust_logits).max())
    ds = float(np.abs(scores - rust_scores).max())
    same_order = list(np.argsort(-logits, kind="stable")) == list(range(len(results)))
    print(
        f"{len(pairs)} pairs, max length {model.max_seq_length}: max abs diff logits {dl:.3e}, "
        f"scores {ds:.3e}; same ranking: {same_order}"
    )
    sys.exit(0 if dl <= 1e-4 and ds <= 1e-4 else 1)


if __name__ == "__main__":
    main()
