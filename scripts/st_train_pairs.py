#!/usr/bin/env python3
"""The sentence-transformers reference for scripts/quality.sh: trains MODEL on a ragd training
file (F-058 JSONL: query, positive, negatives) with the settings of `ragd-worker train` and saves
a sentence-transformers model directory.

    HF_HUB_OFFLINE=1 python scripts/st_train_pairs.py MODEL_DIR train.jsonl OUT_DIR \
        [--max-seq-len N] [--epochs N] [--batch-size N] [--lr X] [--seed N] [--no-dropout]
        [--batches PLAN]

Settings as `ragd-worker train`'s defaults: MultipleNegativesRankingLoss (scale 20, cosine),
AdamW lr 2e-5, weight decay 0.01, linear warm-up over 10% of the steps then linear decay,
gradient-norm clip 1, batch 16 with no text twice in a batch, one epoch, dropout on.
--max-seq-len is the training length: the saved model reads the base model's max_seq_length
again, as `ragd-worker train` exports it. model.fit needs `sentence-transformers[train]`.
Rows with fewer negatives than the most any row has are filled with random passages of the file
(never the row's positive or a duplicate), as `ragd-worker train` does, from Python's own seeded
generator.

With --batches PLAN (written by `ragd-worker train --batch-plan PLAN` with the same settings), the
reference takes ragd's very batches in ragd's order (rows already filled, no shuffle) in a plain
PyTorch loop with the same optimiser, schedule and clipping: only dropout's random streams still
differ, and none with --no-dropout on both sides, so the gap measures the engine alone. The plan
fixes the batches, their order and the epochs: --batch-size, --epochs and --seed do not apply.
"""
import argparse
import itertools
import json
import math
import random

import torch
from sentence_transformers import InputExample, SentenceTransformer, losses
from sentence_transformers.datasets import NoDuplicatesDataLoader


def negative_text(n):
    return n["text"] if isinstance(n, dict) else n


def load_model(a: argparse.Namespace):
    """The base model set to the training length, and the length it reads by itself."""
    model = SentenceTransformer(a.model, device="cpu")
    read_len = model.max_seq_length
    if a.max_seq_len:
        model.max_seq_length = a.max_seq_len
    return model, read_len


def save_model(model: SentenceTransformer, read_len: int, out: str) -> None:
    """Saves the model reading the base model's length again, as ragd-worker train exports."""
    model.max_seq_length = read_len
    model.save(out)
    print(f"saved {out}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--max-seq-len", type=int)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-dropout", action="store_true")
    ap.add_argument("--batches")
    a, unknown = ap.parse_known_args()
    if unknown:
        raise SystemExit(f"st_train_pairs.py: no reference for flags {unknown}")
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    if a.batches:
        train_on_plan(a)
        return
    if a.no_dropout:
        raise SystemExit("st_train_pairs.py: --no-dropout needs --batches (model.fit keeps dropout on)")
    rows = [json.loads(l) for l in open(a.data, encoding="utf-8") if l.strip()]
    for r in rows:
        r["negatives"] = [negative_text(n) for n in r.get("negatives") or []]
    want = max(len(r["negatives"]) for r in rows)
    pool = list(dict.fromkeys(t for r in rows for t in [r["positive"], *r["negatives"]]))
    filled = 0
    for r in rows:
        if len(r["negatives"]) < want:
            filled += 1
            candidates = [p for p in random.sample(pool, min(len(pool), 8 * want + 8))
                          if p != r["positive"] and p not in r["negatives"]]
            r["negatives"] += candidates[: want - len(r["negatives"])]
    rows = [r for r in rows if len(r["negatives"]) == want]
    print(f"{len(rows)} pairs, {want} negatives each ({filled} filled)", flush=True)
    model, read_len = load_model(a)
    examples = [InputExample(texts=[r["query"], r["positive"], *r["negatives"]]) for r in rows]
    # ragd's sampler never puts one text twice in a batch (ICT writes two queries per chunk, so a
    # plain shuffle would often give a row its own positive as a "negative"); model.fit keeps
    # that rule only for a NoDuplicatesDataLoader.
    loader = NoDuplicatesDataLoader(examples, batch_size=a.batch_size)
    steps = len(loader) * a.epochs
    model.fit(
        train_objectives=[(loader, losses.MultipleNegativesRankingLoss(model, scale=20.0))],
        epochs=a.epochs,
        warmup_steps=int(0.1 * steps),
        optimizer_params={"lr": a.lr},
        weight_decay=0.01,
        max_grad_norm=1.0,
        show_progress_bar=False,
    )
    save_model(model, read_len, a.out)


def train_on_plan(a: argparse.Namespace) -> None:
    from transformers import get_linear_schedule_with_warmup

    rows = [json.loads(l) for l in open(a.batches, encoding="utf-8") if l.strip()]
    steps = [list(g) for _, g in itertools.groupby(rows, key=lambda r: r["step"])]
    if any(r["micro"] != 0 for r in rows):
        raise SystemExit("st_train_pairs.py: the plan accumulates micro-batches, which this reference "
                         "does not do; write the plan from a run without --grad-accum")
    model, read_len = load_model(a)
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    named = list(model.named_parameters())
    no_decay = lambda n: n.endswith(".bias") or "LayerNorm" in n
    groups = [
        {"params": [p for n, p in named if not no_decay(n)], "weight_decay": 0.01},
        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(0.1 * len(steps)), len(steps))
    model.train(not a.no_dropout)
    total = 0.0
    for batch in steps:
        columns = list(zip(*[[r["query"], r["positive"], *r["negatives"]] for r in batch]))
        loss = loss_fn([model.tokenize(list(c)) for c in columns], None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        total += float(loss.detach())
    print(f"{len(rows)} rows in {len(steps)} steps (ragd's batches), mean loss {total / len(steps):.4f}", flush=True)
    save_model(model, read_len, a.out)


if __name__ == "__main__":
    main()
