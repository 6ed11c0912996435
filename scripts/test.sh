#!/usr/bin/env bash
# Runs every test of the project (what CI runs). Installs what the tests need first.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

need_root_tools() {
    # The mDNS tests build a simulated LAN of network namespaces: they need `ip` (iproute2) and root.
    if ! command -v ip >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "installing iproute2 (network namespaces for the mDNS tests)"
            apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
        else
            echo "error: the mDNS tests need iproute2 (the 'ip' command) and root: apt-get install iproute2" >&2
            exit 1
        fi
    fi
}

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is not installed: install Rust with rustup (https://rustup.rs), then rerun" >&2
    exit 1
fi
need_root_tools
echo "== fetching all-MiniLM-L6-v2 (parity test), the small LLM (built-in generator test) and llama-cpp-python's server (real-server test)"
./scripts/fetch-models.sh minilm smollm2 llama-cpp-server

echo "== no import loops between source files"
./scripts/check-import-loops.py
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== building the binaries the cross-process tests run"
cargo build --workspace --bins
echo "== cargo test"
cargo test --workspace "$@"
