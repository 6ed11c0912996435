#!/usr/bin/env python3
"""PyTorch / sentence-transformers side of the training benchmark (run once per case by
`cargo run --release -p ragd-engine --example bench_train`, or by hand):

    HF_HUB_OFFLINE=1 python scripts/bench_train_reference.py train MODEL_DIR PAIRS.jsonl \
        --max-len 128 --batch-size 32 --steps 6 --threads 2
    HF_HUB_OFFLINE=1 python scripts/bench_train_reference.py infer MODEL_DIR PASSAGES.jsonl \
        --max-len 128 --passes 3 --threads 2

`train` runs MultipleNegativesRankingLoss (scale 20, AdamW lr 2e-5, dropout on, clipping at 1)
on consecutive batches of PAIRS.jsonl, in file order (the bench writes them in the order ragd's
sampler draws them), with each row's "negatives" as extra columns; it times --steps steps after
2 warm-up steps and reports the median step. `infer` encodes every passage --passes times after
a warm-up and reports the median pass, and the best rate of a 4096 x 4096 torch.mm. Prints one
JSON line with "pairs_per_s" or "texts_per_s" (and "gemm_gflops"), and "peak_rss_bytes" (the
process high-water mark, VmHWM, of the passes or steps).
"""
import argparse
import json
import statistics
import time

import torch
from sentence_transformers import SentenceTransformer, losses

WARMUP = 2


def peak_rss() -> int:
    # VmHWM starts afresh at exec; ru_maxrss would include the parent's peak inherited via fork.
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def read_jsonl(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train(model: SentenceTransformer, a: argparse.Namespace) -> dict:
    pairs = read_jsonl(a.data)
    bs = a.batch_size
    need = (WARMUP + a.steps) * bs
    if len(pairs) < need:
        raise SystemExit(f"{a.data}: {len(pairs)} rows, need {need} for {WARMUP}+{a.steps} steps")
    model.train()
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    n_neg = len(pairs[0].get("negatives", []))

    def step(i: int) -> float:
        batch = pairs[i * bs:(i + 1) * bs]
        columns = [[p["query"] for p in batch], [p["positive"] for p in batch]]
        columns += [[p["negatives"][k] for p in batch] for k in range(n_neg)]
        loss = loss_fn([model.tokenize(c) for c in columns], None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return float(loss)

    times = []
    last = 0.0
    for i in range(WARMUP + a.steps):
        t = time.perf_counter()
        last = step(i)
        if i >= WARMUP:
            times.append(time.perf_counter() - t)
    return {"pairs_per_s": bs / statistics.median(times), "last_loss": last}


def infer(model: SentenceTransformer, a: argparse.Namespace) -> dict:
    passages = [r["text"] for r in read_jsonl(a.data)]
    model.eval()
    model.encode(passages[:64], batch_size=a.batch_size)
    rates = []
    for _ in range(a.passes):
        t = time.perf_counter()
        model.encode(passages, batch_size=a.batch_size)
        rates.append(len(passages) / (time.perf_counter() - t))
    # The high-water mark of the passes, before the product below allocates its matrices.
    out = {"texts_per_s": statistics.median(rates), "peak_rss_bytes": peak_rss()}
    out["gemm_gflops"] = gemm_gflops()
    return out


def gemm_gflops() -> float:
    # The best rate of a 4096 x 4096 f32 product (torch.mm: MKL or oneDNN), GFLOP/s: how fast
    # this machine multiplies at all, for comparing a pass's rate against.
    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["train", "infer"])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = SentenceTransformer(a.model, device="cpu")
    model.max_seq_length = a.max_len
    out = train(model, a) if a.mode == "train" else infer(model, a)
    out.setdefault("peak_rss_bytes", peak_rss())
    out.update({
        "engine": f"sentence-transformers / torch {torch.__version__}",
        "threads": torch.get_num_threads(),
    })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
