#!/usr/bin/env python3
"""PyTorch / sentence-transformers side of the reranker benchmark (run by
`cargo run --release -p ragd-engine --example bench_rerank`, or by hand):

    HF_HUB_OFFLINE=1 python scripts/bench_rerank_reference.py MODEL_DIR ROWS.jsonl \
        --batch-size 16 --max-len 128 --steps 10 --threads 2

MODEL_DIR is loaded as sentence-transformers' CrossEncoder with one label (an encoder gets a new
head). Scoring: CrossEncoder.predict over every (query, positive) and (query, negative) pair of
ROWS, 32 pairs per batch. Training: the same model in a plain PyTorch loop with
BCEWithLogitsLoss (pos_weight = negatives per positive), AdamW lr 1e-4, dropout on, batches of
--batch-size queries x (1 + negatives) pairs, --steps timed steps after 2 warm-up steps.
Prints one JSON line: {"train_pairs_per_s", "score_pairs_per_s", "last_loss", "engine"}.
"""
import argparse
import json
import time

import sentence_transformers
import torch
from sentence_transformers import CrossEncoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("rows")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with open(a.rows, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    model = CrossEncoder(a.model, num_labels=1, max_length=a.max_len, device="cpu")
    pairs = [(r["query"], d) for r in rows for d in [r["positive"], *r["negatives"]]]

    model.predict(pairs[:32], batch_size=32)
    t = time.perf_counter()
    model.predict(pairs, batch_size=32)
    score_rate = len(pairs) / (time.perf_counter() - t)

    hf = model.model
    tok = model.tokenizer
    hf.train()
    n_neg = len(rows[0]["negatives"])
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float(max(n_neg, 1))))
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.01)

    def step(i: int) -> float:
        start = (i * a.batch_size) % max(len(rows) - a.batch_size, 1)
        batch = rows[start : start + a.batch_size]
        qs, ds, ys = [], [], []
        for r in batch:
            for j, d in enumerate([r["positive"], *r["negatives"]]):
                qs.append(r["query"])
                ds.append(d)
                ys.append(1.0 if j == 0 else 0.0)
        enc = tok(qs, ds, padding=True, truncation="longest_first", max_length=a.max_len,
                  return_tensors="pt")
        logits = hf(**enc).logits.view(-1)
        loss = loss_fn(logits, torch.tensor(ys))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        return len(qs), float(loss)

    step(0)
    step(1)
    t = time.perf_counter()
    done, last = 0, float("nan")
    for i in range(a.steps):
        n, last = step(i + 2)
        done += n
    train_rate = done / (time.perf_counter() - t)
    print(json.dumps({
        "engine": f"sentence-transformers {sentence_transformers.__version__} / torch {torch.__version__}",
        "train_pairs_per_s": train_rate,
        "score_pairs_per_s": score_rate,
        "last_loss": last,
    }))


if __name__ == "__main__":
    main()
