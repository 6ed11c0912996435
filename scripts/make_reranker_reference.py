#!/usr/bin/env python3
"""Write the tiny cross-encoder and its sentence-transformers reference logits for the Rust
reranker parity test (worker/tests/parity.rs).

Usage (Python with torch + sentence-transformers installed, no network needed):
    HF_HUB_OFFLINE=1 python scripts/make_reranker_reference.py \
        engine/testdata/tiny-bert engine/testdata/tiny-cross-encoder \
        engine/testdata/tiny-cross-encoder-reference.json

Builds a BertForSequenceClassification (num_labels 1) on the tiny encoder with a seeded random
pooler and classifier (encoder weights scaled up so that logits depend on the pair), saves
it with CrossEncoder.save, and records CrossEncoder.predict logits (Identity activation) and the
default (sigmoid) scores for fixed (query, passage) pairs. Some pairs exceed the model's 64-token
limit on one or both sides, so truncation (longest_first) is part of what is compared.
"""
import json
import sys

import sentence_transformers
import torch
from sentence_transformers import CrossEncoder

LONG = (
    "the cat eats fish near the river and the dog eats seeds near the forest while the horse "
    "eats grass near the barn and the eagle eats mice near the mountain "
)
PAIRS = [
    ["where does the cat find fish?", "the cat eats fish near the river"],
    ["where does the cat find fish?", "the owl eats mice near the lake"],
    ["where does the owl find mice?", "the owl eats mice near the lake"],
    ["a fox", "the fox eats berries near the garden"],
    ["where does the salmon find insects?", LONG * 2],
    [LONG * 2, "where does the rabbit find carrots?"],
    [LONG, LONG * 3],
    ["Padding, truncation: ÉCOLE café naïve 東京 🙂", "short"],
]


def main() -> None:
    encoder_dir, out_dir, out_json = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    model = CrossEncoder(encoder_dir, num_labels=1, device="cpu")
    hf = model.model
    with torch.no_grad():
        # A randomly initialised encoder (std 0.02) gives nearly the same [CLS] state for every
        # input; larger weights make the logits depend on the pair, so the comparison means
        # something.
        for module in hf.bert.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(15.0)
        hf.bert.pooler.dense.weight.normal_(0.0, 0.3)
        hf.classifier.weight.normal_(0.0, 1.0)
        hf.classifier.bias.fill_(0.25)
    model.save(out_dir)
    model = CrossEncoder(out_dir, device="cpu")
    model.eval()
    logits = model.predict(PAIRS, batch_size=3, activation_fn=torch.nn.Identity())
    scores = model.predict(PAIRS, batch_size=3)
    data = {
        "model": out_dir.rstrip("/").split("/")[-1],
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "max_length": model.max_seq_length,
        "pairs": PAIRS,
        "logits": [float(x) for x in logits],
        "scores": [float(x) for x in scores],
    }
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(PAIRS)} reference logits to {out_json}")


if __name__ == "__main__":
    main()
