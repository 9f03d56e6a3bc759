#!/usr/bin/env bash
# The GPU check on a GPU node, from the repository root or anywhere:
#   bash benchmarks/gpu_check.sh [--out gpu.json] [other benchmarks/gpu_check.py options]
# Uses $PYTHON, else .venv/bin/python, else python3 (a node image that already has a CUDA torch).
# Wheels in .whl/ (packages the image lacks, e.g. kornia, kornia-rs, webdataset, braceexpand,
# faiss-cpu) are installed into /tmp/site first; selfsup itself is installed without network
# if it cannot be imported. Output is also written to gpu_check.log (~7-8 min on one H200).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" -c "import selfsup.pretrain.methods" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
case " $* " in
  *" --dry-run "* | *" -h "* | *" --help "*) ;;
  *) "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else
       f"gpu_check: this torch ({torch.__version__}) sees no GPU; on a GPU node: "
       "rm -rf .venv && make setup TORCH_SPEC=torch, or PYTHON=<a python with CUDA torch>")' ;;
esac
export PYTHONUNBUFFERED=1
"$PYTHON" benchmarks/gpu_check.py "$@" 2>&1 | tee gpu_check.log
