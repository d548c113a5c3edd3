#!/usr/bin/env bash
# Create ./.venv (once) and install streamtrain into it with the given extras: `bash tools/setup_env.sh dev`.
# torch==2.13.0 goes in first: a CPU build served from local disk, where a bare `torch` requirement would
# pull a multi-GB CUDA build. Used by .ci/run and tools/main_job.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-dev}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi

pip_install() {
    # This machine's pip configuration names extra index folders that may not exist; pip says so once per
    # package on every install. Keep pip's other messages, and all of them when it fails.
    local log
    log=$(mktemp)
    if ! .venv/bin/python -m pip install -q "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    grep -v "is ignored: it is neither a file nor a directory" "$log" >&2 || true
    rm -f "$log"
}

pip_install torch==2.13.0
pip_install -e ".[$extras]"
