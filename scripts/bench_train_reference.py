#!/usr/bin/env python3
"""PyTorch / sentence-transformers side of the training benchmark (run by
`cargo run --release -p ragd-engine --example bench_train`, or by hand):

    HF_HUB_OFFLINE=1 python scripts/bench_train_reference.py MODEL_DIR PAIRS.jsonl PASSAGES.jsonl \
        --batch-size 32 --max-len 128 --steps 10 --threads 2

Trains with MultipleNegativesRankingLoss (scale 20, AdamW lr 2e-5, dropout on) for --steps
timed steps after 2 warm-up steps, then encodes the passages. Prints one JSON line:
{"train_pairs_per_s", "infer_texts_per_s", "peak_rss_train_bytes", "peak_rss_infer_bytes", ...}.
Peak RSS is the process high-water mark (VmHWM) after inference and after training.
"""
import argparse
import json
import resource
import time

import torch
from sentence_transformers import SentenceTransformer, losses


def peak_rss() -> int:
    # VmHWM starts afresh at exec; ru_maxrss would include the parent's peak inherited via fork.
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("pairs")
    ap.add_argument("passages")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    pairs = [json.loads(l) for l in open(a.pairs, encoding="utf-8") if l.strip()]
    passages = [json.loads(l)["text"] for l in open(a.passages, encoding="utf-8") if l.strip()]
    model = SentenceTransformer(a.model, device="cpu")
    model.max_seq_length = a.max_len

    model.eval()
    model.encode(passages[:64], batch_size=a.batch_size)
    t = time.perf_counter()
    model.encode(passages, batch_size=a.batch_size)
    infer = len(passages) / (time.perf_counter() - t)
    rss_infer = peak_rss()

    model.train()
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    bs = a.batch_size

    def step(i: int) -> float:
        batch = [pairs[(i * bs + j) % len(pairs)] for j in range(bs)]
        feats = [model.tokenize([p["query"] for p in batch]), model.tokenize([p["positive"] for p in batch])]
        loss = loss_fn(feats, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return float(loss)

    for i in range(2):
        step(i)
    t = time.perf_counter()
    last = 0.0
    for i in range(2, 2 + a.steps):
        last = step(i)
    train = a.steps * bs / (time.perf_counter() - t)
    print(json.dumps({
        "engine": f"sentence-transformers / torch {torch.__version__}",
        "train_pairs_per_s": train,
        "infer_texts_per_s": infer,
        "peak_rss_infer_bytes": rss_infer,
        "peak_rss_train_bytes": peak_rss(),
        "last_loss": last,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
