#!/usr/bin/env bash
# Rebuilds the real-question test sets in this directory from their Debian packages (bookworm):
# downloads the packages with apt-get (no root needed), unpacks them with dpkg -x into a
# temporary directory and runs the builders (Python 3 standard library only).
#
# Usage: data/realq/build.sh [OUT_DIR]   (default: this directory)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
work="$(mktemp -d -t ragd-realq-XXXXXX)"
trap 'rm -rf "$work"' EXIT
cd "$work"
for p in perl-doc zsh-doc xterm; do
    apt-get download "$p" >/dev/null || {
        echo "error: apt-get download $p failed: this needs Debian's package index (apt-get update)" >&2
        exit 1
    }
    mkdir "$p" && dpkg -x "$p"_*.deb "$p"
    echo "$p: $(ls "$p"_*.deb)"
done
python3 "$here/build_perlfaq.py" perl-doc/usr/share/perl/5.*/pod "$out/perlfaq"
python3 "$here/build_termfaq.py" zsh-doc/usr/share/doc/zsh-common/html \
    xterm/usr/share/doc/xterm/xterm.faq.html "$out/termfaq"
