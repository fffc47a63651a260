#!/usr/bin/env bash
# bench/gpu_check.sh: the GPU acceptance checks of vlsi in ONE run (<= 8 minutes on one H100/H200), one table.
#
#   bash bench/gpu_check.sh --wheels DIR        # on the GPU machine: install the carried wheels, run, print the table
#   bash bench/gpu_check.sh --dry-run           # every step at tiny shapes on CPU (CI's environment), targets not applied
#   bash bench/gpu_check.sh --fetch-wheels DIR  # on a machine with an index: download the wheels to carry
#
# Steps (each bounded by its own timeout, results as JSON under --out):
#   1. ops tests    pytest tests/ops/test_autocast.py tests/ops/test_triton.py tests/ops/test_sampled_kl.py
#                   tests/train/test_genrecal_losses.py: compiled Triton kernels and every op
#                   under CUDA (and CPU) bf16 autocast against float64 references   target: all pass, none skipped
#                   on CUDA
#   2. head top-k   bench/kernels_bench.py --topk-only at 4096 tokens x 8192 x 152,064 (72B head): fused Triton
#                   head top-k time as a ratio to the bare bf16 GEMM (fp32 out) measured in the same run   >= 0.85
#   3. train step   bench/train_bench.py at Qwen2-VL-2B shapes (28 x 1536, vocab 151,936, LoRA r64) with 7
#                   verbalizers: interaction vs plain SFT, tokens/s   >= 0.9x   and peak memory   <= 1.1x
#   4. extraction   bench/extract_bench.py --shape 7b-random: end-to-end run_extract (reading, encoding, writing
#                   overlapped) vs forward + verbalizers + heads alone, tokens/s   >= 0.95
#
# Options: --out DIR (default /tmp/vlsi-gpu-check), --python PY (default: $PYTHON, else ./.venv/bin/python, else
# python3), --wheels DIR (pip install --no-index --find-links DIR: zarr, numcodecs, polars, click, crc32c, pytest,
# ... -- the device image has torch, transformers, triton, peft, accelerate, pyarrow), --skip STEP (repeatable).
# Exit status: 0 when every step met its target (always 0 in --dry-run unless a step failed to run), 1 otherwise.

set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
WHEELS=""
FETCH=""
OUT=/tmp/vlsi-gpu-check
PY=${PYTHON:-}
SKIP=" "
WHEEL_PKGS="zarr numcodecs polars click crc32c donfig pytest pluggy iniconfig pillow pyyaml tqdm fsspec safetensors"

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS=$2; shift ;;
    --fetch-wheels) FETCH=$2; shift ;;
    --out) OUT=$2; shift ;;
    --python) PY=$2; shift ;;
    --skip) SKIP="$SKIP$2 "; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi

if [ -n "$FETCH" ]; then  # wheels for the device image's Python (set WHEEL_PYTHON=3.x when it differs from $PY's)
  mkdir -p "$FETCH"
  extra=()
  if [ -n "${WHEEL_PYTHON:-}" ]; then
    extra=(--python-version "$WHEEL_PYTHON" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux_2_28_x86_64 --only-binary=:all:)
  fi
  # shellcheck disable=SC2086
  exec "$PY" -m pip download -d "$FETCH" ${extra[@]+"${extra[@]}"} $WHEEL_PKGS
fi

mkdir -p "$OUT"
T_START=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - T_START ))s] $*" >&2; }

# ---- 0. environment ------------------------------------------------------------------------------------------------
if [ -n "$WHEELS" ]; then
  # by name, never upgrading what the image has (torch's numpy stays); one call, else one package at a time so a
  # name missing from DIR but present in the image does not stop the others
  log "installing wheels from $WHEELS"
  # shellcheck disable=SC2086
  if ! "$PY" -m pip install -q --no-index --find-links "$WHEELS" $WHEEL_PKGS >"$OUT/pip.log" 2>&1; then
    for pkg in $WHEEL_PKGS; do
      "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$pkg" >>"$OUT/pip.log" 2>&1 \
        || log "pip: $pkg not installed from $WHEELS (see $OUT/pip.log)"
    done
  fi
fi
if ! "$PY" -c "import vlsi.ops, vlsi.train.losses, vlsi.extract.run" >/dev/null 2>&1; then
  log "vlsi is not installed: pip install --no-deps -e ."
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >"$OUT/pip-vlsi.log" 2>&1; then
    # no setuptools / no write access: the same namespace layout through symlinks (pyproject's package-dir)
    log "editable install failed; importing through a symlinked namespace on PYTHONPATH"
    NS="$OUT/pythonpath/vlsi"
    mkdir -p "$NS"
    for pkg in common cache_format models ops extract train eval demo; do ln -sfn "$ROOT/$pkg" "$NS/$pkg"; done
    export PYTHONPATH="$OUT/pythonpath${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
"$PY" -c "import vlsi.ops, vlsi.train.losses, vlsi.extract.run, zarr, polars, click, pytest" \
  || { log "the environment cannot import vlsi and its dependencies; pass --wheels DIR"; exit 1; }

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$DRY" = 0 ] && [ "$HAS_CUDA" != 1 ]; then
  log "no CUDA device: run with --dry-run on a CPU machine"; exit 1
fi
export TOKENIZERS_PARALLELISM=false
STATUS="$OUT/status.txt"
: >"$STATUS"

# run NAME TIMEOUT CMD...: stdout+stderr to OUT/NAME.log, exit status and seconds to OUT/status.txt
run() {
  local name=$1 limit=$2; shift 2
  if [[ "$SKIP" == *" $name "* ]]; then echo "$name skipped 0" >>"$STATUS"; return; fi
  log "$name: $*"
  local t0=$(date +%s) rc
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name $rc $(( $(date +%s) - t0 ))" >>"$STATUS"
  [ $rc = 0 ] || { log "$name: exit $rc (last lines of $OUT/$name.log:)"; tail -5 "$OUT/$name.log" >&2; }
}

# ---- 1-4: the steps ------------------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  run ops_tests 300 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/ops_tests.xml" \
    tests/ops/test_autocast.py tests/ops/test_triton.py tests/ops/test_sampled_kl.py tests/train/test_genrecal_losses.py
  run head_topk 120 "$PY" bench/kernels_bench.py --shapes 128x256x8192 --topk-only --dtype bf16 --repeats 2 \
    --out "$OUT/head_topk.json"
  run train_step 180 "$PY" bench/train_bench.py --small --steps 1 --ts 3 --json "$OUT/train_step.json"
  run extraction 180 "$PY" bench/extract_bench.py --shape small --samples 8 --batch-size 4 --json
else
  run ops_tests 150 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/ops_tests.xml" \
    tests/ops/test_autocast.py tests/ops/test_triton.py tests/ops/test_sampled_kl.py tests/train/test_genrecal_losses.py
  run head_topk 75 "$PY" bench/kernels_bench.py --shapes 4096x8192x152064 --topk-only --dtype bf16 --repeats 5 \
    --out "$OUT/head_topk.json"
  run train_step 105 "$PY" bench/train_bench.py --shape 2b-random --ts 7 --steps 3 --json "$OUT/train_step.json"
  run extraction 120 "$PY" bench/extract_bench.py --shape 7b-random --samples 384 --batch-size 32 --json
fi
grep -h '^{' "$OUT/extraction.log" 2>/dev/null | tail -1 >"$OUT/extraction.json"

# ---- the table -----------------------------------------------------------------------------------------------------
"$PY" - "$OUT" "$DRY" "$(( $(date +%s) - T_START ))" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, dry, total = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
status = {}
for line in (out / "status.txt").read_text().splitlines():
    name, rc, secs = line.split()
    status[name] = (rc, int(secs))


def load(name):
    p = out / f"{name}.json"
    try:
        return json.loads(p.read_text()) if p.is_file() and p.stat().st_size else None
    except ValueError:
        return None


rows = []  # (step, measured, target, ok)


def add(step, measured, target, ok):
    rows.append((step, measured, target, ok))


def ran(name):
    rc, _ = status.get(name, ("missing", 0))
    return rc == "0", rc


# 1. ops tests
ok, rc = ran("ops_tests")
xml = out / "ops_tests.xml"
if xml.is_file():
    s = ET.parse(xml).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    n, f, e, sk = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    # on the GPU the CUDA cases must run: a skipped test of test_triton.py or an autocast-cuda case is a failure
    # (the CPU-tensor Triton cases skip there by design: no interpreter when CUDA is present)
    must_run = [c for c in s.iter("testcase") if c.find("skipped") is not None
                and ("test_triton" in c.get("classname", "") or "autocast-cuda" in c.get("name", ""))]
    cuda_ok = dry or not must_run
    add("ops tests (Triton + autocast)", f"{n - f - e - sk} passed, {f + e} failed, {sk} skipped"
        + (f" ({len(must_run)} CUDA cases skipped)" if must_run and not dry else ""),
        "all pass" + ("" if dry else ", CUDA cases run"), ok and f + e == 0 and cuda_ok)
else:
    add("ops tests (Triton + autocast)", f"did not run (exit {rc})", "all pass", False)

# 2. head top-k vs GEMM
ok, rc = ran("head_topk")
k = load("head_topk")
if ok and k:
    r = k["rows"][0]
    ratio = r["topk_triton_gemm_ratio"] if r["topk_triton_gemm_ratio"] is not None else r["topk_torch_gemm_ratio"]
    path = "triton" if r["topk_triton_gemm_ratio"] is not None else "torch"
    add(f"head top-k {r['tokens']}x{r['hidden']}x{r['vocab']} / bf16 GEMM", f"{ratio:.3f} ({path}; GEMM "
        f"{r['gemm_ms']:.2f} ms, top-k {r[f'topk_{path}_ms']:.2f} ms)", ">= 0.85", dry or ratio >= 0.85)
else:
    add("head top-k / bf16 GEMM", f"did not run (exit {rc})", ">= 0.85", False)

# 3. train step
ok, rc = ran("train_step")
t = load("train_step")
if ok and t:
    sp, mem = t["speed_ratio_b_over_a"], t["memory_ratio_b_over_a"]
    shape = f"{t['layers']}x{t['hidden']}, vocab {t['vocab']}, ts {t['ts']}, B{t['batch']} T{t['seq']}"
    add(f"train step interact/SFT tokens/s ({shape})", f"{sp:.3f} ({t['interact']['tokens_per_s']:.0f} vs "
        f"{t['sft']['tokens_per_s']:.0f} tok/s)", ">= 0.9", dry or sp >= 0.9)
    add("train step interact/SFT peak memory", "n/a (CPU)" if mem is None else
        f"{mem:.3f} ({t['interact']['peak_mb']:.0f} vs {t['sft']['peak_mb']:.0f} MiB)", "<= 1.1",
        dry or (mem is not None and mem <= 1.1))
else:
    add("train step interact/SFT", f"did not run (exit {rc})", ">= 0.9x, <= 1.1x", False)

# 4. extraction
ok, rc = ran("extraction")
x = load("extraction")
if ok and x:
    cb = x["c_over_b"]
    add(f"extraction end-to-end / forward + heads ({x['shape']}, {x['samples']} samples)",
        f"{cb:.3f} ({x['c_full_tok_s']:.0f} vs {x['b_verbalized_tok_s']:.0f} tok/s)" if cb is not None else "n/a",
        ">= 0.95", dry or (cb is not None and cb >= 0.95))
else:
    add("extraction end-to-end / forward + heads", f"did not run (exit {rc})", ">= 0.95", False)

w = [max(len(str(r[i])) for r in rows + [("step", "measured", "target", "")]) for i in range(3)]
mode = "DRY RUN (tiny shapes, CPU; targets shown, not applied)" if dry else "GPU"
print(f"\nvlsi GPU check: {mode}; {total}s; logs and JSON in {out}")
print(f"| {'step':<{w[0]}} | {'measured':<{w[1]}} | {'target':<{w[2]}} | result |")
print(f"|{'-' * (w[0] + 2)}|{'-' * (w[1] + 2)}|{'-' * (w[2] + 2)}|--------|")
for step, measured, target, ok in rows:
    res = ("ran" if ok else "FAIL") if dry else ("pass" if ok else "FAIL")
    print(f"| {step:<{w[0]}} | {measured:<{w[1]}} | {target:<{w[2]}} | {res:<6} |")
times = ", ".join(f"{n} {s}s" for n, (_, s) in status.items())
print(f"step times: {times}")
sys.exit(0 if all(r[3] for r in rows) else 1)
EOF
