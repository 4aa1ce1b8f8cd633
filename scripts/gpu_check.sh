#!/usr/bin/env bash
# GPU tier, part (a), on a fresh GPU machine: bitsandbytes' CUDA LLM.int8 against the reference
# simulation on tiny models (tests/gpu/test_gpu_tier.py -k cuda). Target: well under 3 minutes.
#
#   bash scripts/gpu_check.sh [extra pytest args]   run the check
#   bash scripts/gpu_check.sh --fetch-wheels        fill ./.wheelhouse (on a machine with PyPI access),
#                                                   for GPU machines without network: carry it along
#
# Torch is never installed: the machine's own torch (its CUDA build) is used, and pip is held to that
# exact version by a constraint. Only missing dependencies are installed (into the interpreter's venv or
# conda env, else into .gpu-venv, which sees the system's packages), from ./.wheelhouse when it exists,
# else from PyPI. $PYTHON picks the interpreter (default python3).
# Results: stdout, and $OUT/gpu_check.log + $OUT/gpu_check.xml when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-python3}"
DEPS=(
  "bitsandbytes==0.50.2" "transformers>=4.56" "tokenizers>=0.20" "safetensors>=0.4" "accelerate>=0.30"
  "numpy>=1.26" "tqdm>=4.66" "jinja2>=3.1" "pytest>=8"
)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  "$PY" -m pip download --only-binary=:all: -d .wheelhouse "${DEPS[@]}" --no-deps
  # Their own dependencies, minus torch (the GPU machine brings its own).
  "$PY" -m pip download --only-binary=:all: -d .wheelhouse \
    "huggingface-hub" "pyyaml" "regex" "packaging" "filelock" "fsspec" "typer-slim" "pluggy" "iniconfig" \
    "markupsafe" "psutil" "click" "typing-extensions" --no-deps
  du -sh .wheelhouse
  exit 0
fi

start=$(date +%s)
"$PY" - <<'EOF' || { echo "gpu_check: this machine has no torch that sees a CUDA device; nothing to check"; exit 2; }
import sys
import torch
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit(1)
for i in range(torch.cuda.device_count()):
    print(f"gpu_check: device {i}: {torch.cuda.get_device_name(i)}")
EOF

# Install into the interpreter's own environment when it is a venv/conda env (its torch lives there);
# otherwise into .gpu-venv, which sees the system's packages (and so the system's torch).
if [[ "$("$PY" -c 'import sys; print(int(sys.prefix != sys.base_prefix or "conda" in sys.version))')" == 1 ]]; then
  run="$PY"
else
  [[ -x .gpu-venv/bin/python ]] || "$PY" -m venv --system-site-packages .gpu-venv
  run="$PWD/.gpu-venv/bin/python"
fi
constraints="$(mktemp)"
"$run" -c "import torch; print(f'torch=={torch.__version__}')" > "$constraints"
if ! "$run" -c "import bitsandbytes, transformers, tokenizers, safetensors, accelerate, numpy, tqdm, jinja2, pytest" \
    2>/dev/null; then
  source_args=()
  [[ -d .wheelhouse ]] && source_args=(--no-index --find-links .wheelhouse)
  "$run" -m pip install -q "${source_args[@]}" -c "$constraints" "${DEPS[@]}" || {
    echo "gpu_check: could not install ${DEPS[*]} (no network? run --fetch-wheels elsewhere and carry .wheelhouse)"
    exit 3
  }
fi
"$run" -c "import bitsandbytes, transformers; print(f'gpu_check: bitsandbytes {bitsandbytes.__version__}, transformers {transformers.__version__}')"
echo "gpu_check: environment ready after $(( $(date +%s) - start )) s"

report=()
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  report=(--junitxml "$OUT/gpu_check.xml")
fi
set +e
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 170 "$run" -m pytest tests/gpu/test_gpu_tier.py \
  -m gpu -k cuda -p no:cacheprovider -q -rs -s "${report[@]}" "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
rc=${PIPESTATUS[0]}
set -e
echo "gpu_check: finished with exit code $rc after $(( $(date +%s) - start )) s"
exit "$rc"
