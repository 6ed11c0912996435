#!/usr/bin/env bash
# Brings up a coordinator and two workers on this machine (loopback, static peers), shows them in
# `ragd-coord workers`, then stops them. Pass --keep to leave them running.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0; [ "${1:-}" = "--keep" ] && keep=1

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is not installed: install Rust with rustup (https://rustup.rs), then rerun" >&2
    exit 1
fi
echo "== building ragd-coord and ragd-worker"
cargo build --release --bins -p ragd-coordinator -p ragd-worker
bin="${CARGO_TARGET_DIR:-target}/release"

demo="$(mktemp -d -t ragd-demo-XXXXXX)"
pids=()
cleanup() {
    if [ "$keep" = 0 ]; then
        for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
        wait 2>/dev/null || true
        rm -rf "$demo"
    fi
}
trap cleanup EXIT

coord=("$bin/ragd-coord" --state-dir "$demo/coordinator")
# mDNS is off in the demo: on a real LAN leave it on and drop --peer / --coordinator.
"${coord[@]}" init --id demo-coordinator | tee "$demo/init.txt"
token="$(grep -o 'ragd1-[a-z0-9-]*' "$demo/init.txt" | head -1)"

"${coord[@]}" serve --listen 127.0.0.1:17700 --no-mdns \
    --peer 127.0.0.1:17701 --peer 127.0.0.1:17702 >"$demo/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$demo/coordinator/admin.sock" ] && break; sleep 0.1; done

for i in 1 2; do
    w=("$bin/ragd-worker" --state-dir "$demo/worker$i" --no-mdns)
    "${w[@]}" join "$token" --coordinator 127.0.0.1:17700 --name "worker$i"
    "${w[@]}" run --listen "127.0.0.1:1770$i" >"$demo/worker$i.log" 2>&1 &
    pids+=($!)
done

echo "== waiting for both workers to be ready"
for _ in $(seq 150); do
    n="$("${coord[@]}" workers --json 2>/dev/null | grep -c '"state": "Ready"' || true)"
    [ "$n" = 2 ] && break
    sleep 0.2
done
echo
"${coord[@]}" workers
if [ "$keep" = 1 ]; then
    echo
    echo "Left running (state and logs in $demo). Stop with: kill ${pids[*]}"
fi
