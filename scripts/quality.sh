#!/usr/bin/env bash
# Retrieval quality benchmark (not a test): runs the one-machine pipeline on every real-question
# set and prints, per set, base vs fine-tuned MRR@10 / NDCG@10 on the real questions with their
# paired bootstrap 95% intervals and verdict, beside the product's own verdict (its held-out
# generated queries). With --python, sentence-transformers is trained on the very same batches
# (ragd's batch plan) with the same settings and scored by the same evaluator (the engine's
# parity check); PY is a Python with `pip install torch sentence-transformers`.
#
# Usage: scripts/quality.sh [--sets "debfaq perlfaq termfaq"] [--llm SPEC] [--python PY]
#                           [--out DIR] [-- extra `ragd-worker generate-data` flags]
# --llm is generate-data's query generator, `ict` by default; `builtin+ict` has the built-in LLM
# (SmolLM2, fetched here) write questions within --llm-budget (pass it after --) and ICT cover
# the rest.
# Environment: RAGD_TRAIN_FLAGS="--max-seq-len 128 ..." adds flags to `ragd-worker train` (and
# the same settings are given to the reference).
#
# Sets: debfaq = ../shared/data/debfaq, perlfaq and termfaq = data/realq/ (see its README).
set -euo pipefail
cd "$(dirname "$0")/.."
sets="debfaq perlfaq termfaq"; llm=ict; python=""; out=""; extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --sets) sets="$2"; shift 2 ;;
        --llm) llm="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "unknown argument $1 (usage: $0 [--sets LIST] [--llm SPEC] [--python PY] [--out DIR] [-- generate-data flags])" >&2; exit 2 ;;
    esac
done
out="${out:-$(mktemp -d -t ragd-quality-XXXXXX)}"
mkdir -p "$out"
read -r -a train_flags <<<"${RAGD_TRAIN_FLAGS:-}"

echo "== building ragd (release)"
cargo build --release --workspace --bins   # the whole workspace: the same features as the other release builds
w="${CARGO_TARGET_DIR:-target}/release/ragd-worker"
scripts/fetch-models.sh minilm
case "$llm" in builtin*) scripts/fetch-models.sh smollm2 ;; esac
base=models/all-MiniLM-L6-v2

set_dir() {
    case "$1" in
        debfaq) echo ../shared/data/debfaq ;;
        *) echo "data/realq/$1" ;;
    esac
}

for set in $sets; do
    src="$(set_dir "$set")"
    [ -f "$src/corpus.jsonl" ] || { echo "error: no test set at $src (corpus.jsonl missing)" >&2; exit 1; }
    run="$out/$set"
    rm -rf "$run" && mkdir -p "$run/corpus"
    echo "== $set: corpus as a ragd chunk export (one chunk per section, document = page)"
    python3 scripts/beir_to_chunks.py "$src" "$run/corpus" >/dev/null
    echo "== $set: generate-data --llm $llm ${extra[*]:-}"
    "$w" generate-data --corpus "$run/corpus" --out "$run/data" --tokenizer "$base/tokenizer.json" \
        --llm "$llm" --no-progress "${extra[@]}" >"$run/generate.log" 2>&1 || { tail -20 "$run/generate.log"; exit 1; }
    echo "== $set: train (${train_flags[*]:-defaults})"
    t0=$(date +%s)
    "$w" train --data "$run/data/train.jsonl" --base-model "$base" --out "$run/model" \
        --batch-plan "$run/plan.jsonl" "${train_flags[@]}" >"$run/train.log" 2>&1 || { tail -20 "$run/train.log"; exit 1; }
    echo "   $(( $(date +%s) - t0 )) s; $(grep -m1 -o 'note: .*' "$run/train.log" || true)"
    "$w" evaluate --model "$run/model" --baseline "$base" --test-data "$run/data/test" --dims 384 \
        --json "$run/self.json" >"$run/self.txt"
    "$w" evaluate --model "$run/model" --baseline "$base" --test-data "$src" --dims 384 \
        --json "$run/real.json" >"$run/real.txt"
    if [ -n "$python" ]; then
        echo "== $set: sentence-transformers on the same batches"
        HF_HUB_OFFLINE=1 "$python" scripts/st_train_pairs.py "$base" "$run/data/train.jsonl" \
            "$run/st-model" --batches "$run/plan.jsonl" "${train_flags[@]}" >"$run/st.log" 2>&1 || { tail -20 "$run/st.log"; exit 1; }
        "$w" evaluate --model "$run/st-model" --baseline "$base" --test-data "$src" --dims 384 \
            --json "$run/st.json" >"$run/st.txt"
    fi
done

echo
python3 - "$out" $sets <<'EOF'
import json, os, sys
out, sets = sys.argv[1], sys.argv[2:]
def load(s, name):
    p = os.path.join(out, s, name)
    return json.load(open(p)) if os.path.exists(p) else None
def cell(c, key):
    d = c[key]
    return f"{d['base']:.4f} -> {d['tuned']:.4f} ({d['delta']:+.4f}, {d['delta'] / d['base'] * 100:+.1f}%, CI {d['low']:+.4f}..{d['high']:+.4f})"
print("| set | questions | real MRR@10 | real NDCG@10 | real verdict | self-grade verdict (held-out generated) | sentence-transformers MRR@10 (gap) |")
print("|---|---|---|---|---|---|---|")
for s in sets:
    real, own, st = load(s, "real.json"), load(s, "self.json"), load(s, "st.json")
    rc, oc = real["comparison"], own["comparison"]
    st_cell = "-"
    if st:
        m = st["comparison"]["mrr_at_10"]["tuned"]
        st_cell = f"{m:.4f} ({rc['mrr_at_10']['tuned'] - m:+.4f})"
    own_cell = f"{oc['verdict']} (MRR@10 {oc['mrr_at_10']['delta']:+.4f}, {oc['queries']} queries)"
    print(f"| {s} | {rc['queries']} | {cell(rc, 'mrr_at_10')} | {cell(rc, 'ndcg_at_10')} | {rc['verdict']} | {own_cell} | {st_cell} |")
print(f"\n(details in {out}/SET/: generate.log, train.log, real.txt, self.txt, st.txt)")
EOF
