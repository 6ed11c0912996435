#!/usr/bin/env python3
"""Write sentence-transformers reference embeddings for the Rust parity tests.

Usage (Python with torch + sentence-transformers installed, no network needed):
    HF_HUB_OFFLINE=1 python scripts/make_reference_vectors.py MODEL_DIR OUT.json

MODEL_DIR is a local sentence-transformers directory (for example all-MiniLM-L6-v2 unpacked by
shared/tools/fetch-minilm.sh, or engine/testdata/tiny-bert). The sentences are fixed below; the
Rust tests embed the same sentences and compare (max abs diff <= 1e-5).
"""
import json
import sys

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

SENTENCES = [
    "the cat eats fish near the river",
    "where does the owl find mice?",
    "How do I upgrade Debian to a new release?",
    "A man is playing a guitar on stage.",
    "PostgreSQL supports transactional DDL, so schema changes can be rolled back.",
    "short",
    "Padding, truncation and lower-casing: ÉCOLE café naïve — 東京 🙂 and a much longer "
    "sentence that keeps going so that the batch has to be padded for the shorter ones above.",
]


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = SentenceTransformer(model_dir, device="cpu")
    model.eval()
    emb = model.encode(SENTENCES, batch_size=4, convert_to_numpy=True)
    data = {
        "model": model_dir.rstrip("/").split("/")[-1],
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "max_seq_length": model.max_seq_length,
        "sentences": SENTENCES,
        "embeddings": [[float(x) for x in row] for row in emb],
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    print(f"wrote {len(SENTENCES)} x {emb.shape[1]} reference embeddings to {out}")


if __name__ == "__main__":
    main()
