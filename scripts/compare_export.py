#!/usr/bin/env python3
"""Load a model directory exported by `ragd-worker train` with sentence-transformers and compare
its embeddings with the Rust engine's.

Usage:
    ragd-worker embed-check ...   (not needed: the Rust side writes the vectors itself)
    HF_HUB_OFFLINE=1 python scripts/compare_export.py EXPORTED_DIR RUST_VECTORS.json

RUST_VECTORS.json is written by `cargo run -p ragd-engine --example embed_texts -- DIR OUT.json`
and holds {"sentences": [...], "embeddings": [[...]]}. Prints the max abs difference and the
minimum cosine; exits 1 when the max abs difference exceeds 1e-5.
"""
import json
import sys

import numpy as np
from sentence_transformers import SentenceTransformer


def main() -> None:
    model_dir, vectors = sys.argv[1], sys.argv[2]
    with open(vectors, encoding="utf-8") as f:
        data = json.load(f)
    model = SentenceTransformer(model_dir, device="cpu")
    ref = model.encode(data["sentences"], batch_size=8, convert_to_numpy=True)
    rust = np.asarray(data["embeddings"], dtype=np.float32)
    diff = float(np.abs(ref - rust).max())
    cos = (ref * rust).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(rust, axis=1))
    print(f"{len(ref)} texts, dim {ref.shape[1]}: max abs diff {diff:.3e}, min cosine {cos.min():.8f}")
    sys.exit(0 if diff <= 1e-5 else 1)


if __name__ == "__main__":
    main()
