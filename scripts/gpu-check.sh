#!/usr/bin/env bash
# GPU check: install pymooncake[cuda] into a fresh venv, run tests/gpu on the real
# device and bench/gpu_bench.py, and print one summary table.
#
# Needs: an NVIDIA GPU with its driver (nvidia-smi), Python 3.10+, pip access to
# PyPI.  Runs from any fresh copy of the repository in well under 5 minutes:
#   bash scripts/gpu-check.sh            # venv in .gpu-venv (reused when present)
#   GPU_VENV=/tmp/v bash scripts/gpu-check.sh
#   BENCH_SIZE=64M bash scripts/gpu-check.sh
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu-check.sh   # no GPU: the same steps on the fake device
# Exit status: 0 when every GPU test passed and the bench ran, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${GPU_VENV:-$REPO/.gpu-venv}
OUT=${GPU_CHECK_OUT:-$REPO/bench/results/gpu-check}
BENCH_SIZE=${BENCH_SIZE:-256M}
DRY=${GPU_CHECK_DRY_RUN:-0}
BENCH_DEVICE=cuda
mkdir -p "$OUT"
say() { printf '[gpu-check %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
START=$(date +%s)

# --- the machine ------------------------------------------------------------------
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for cand in python3.13 python3.12 python3.11 python3.10 python3; do
        if command -v "$cand" >/dev/null 2>&1 &&
            "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            PY=$cand
            break
        fi
    done
fi
[ -n "$PY" ] || { say "no Python 3.10+ found (set PYTHON=...)"; exit 1; }
if [ "$DRY" = 1 ]; then
    GPU="none (dry run on the fake device)"
    CUDA_VER=""
    BENCH_DEVICE=fake
elif ! command -v nvidia-smi >/dev/null 2>&1; then
    say "nvidia-smi not found: this script needs a machine with an NVIDIA GPU and its driver"
    exit 1
else
    GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
    CUDA_VER=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\.\([0-9]*\).*/\1.\2/p' | head -1)
fi
CUDA_MAJOR=${CUDA_VER%%.*}
# cuda-python follows the driver's CUDA major version: 13.x needs a CUDA 13 driver
if [ "${CUDA_MAJOR:-12}" -ge 13 ] 2>/dev/null; then
    CUDA_SPEC="cuda-python>=13,<14"
else
    CUDA_SPEC="cuda-python>=12.9,<13"
fi
say "GPU: $GPU; driver CUDA ${CUDA_VER:-?}; Python $($PY -c 'import platform; print(platform.python_version())'); $CUDA_SPEC"

# --- install ----------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PY" -m venv "$VENV" || exit 1
fi
say "installing pymooncake[cuda,test] ($CUDA_SPEC)"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VENV/bin/python" -m pip install -q -e "$REPO[cuda,test]" "$CUDA_SPEC" >"$OUT/pip.log" 2>&1; then
    say "pip install failed:"; tail -20 "$OUT/pip.log" >&2; exit 1
fi
if ! "$VENV/bin/python" -c 'import sys; from pymooncake.transfer.device import get_backend; print(get_backend(sys.argv[1]).describe())' "$BENCH_DEVICE" >"$OUT/device.txt" 2>&1; then
    say "the CUDA backend does not start:"; cat "$OUT/device.txt" >&2; exit 1
fi
DEVICE=$(cat "$OUT/device.txt")
say "CUDA backend: $DEVICE"

# --- tests ------------------------------------------------------------------------------
say "running tests/gpu (fake, cuda-emulated and real cuda variants)"
timeout 240 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/gpu \
    --junitxml="$OUT/junit.xml" -o junit_family=xunit1 >"$OUT/pytest.log" 2>&1
TEST_RC=$?
tail -5 "$OUT/pytest.log" >&2

# --- bench ------------------------------------------------------------------------------
say "running bench/gpu_bench.py --device $BENCH_DEVICE --size $BENCH_SIZE"
timeout 180 "$VENV/bin/python" bench/gpu_bench.py --device "$BENCH_DEVICE" --size "$BENCH_SIZE" --repeat 3 \
    >"$OUT/bench.log" 2>&1
BENCH_RC=$?
[ $BENCH_RC -eq 0 ] || { say "bench failed:"; tail -20 "$OUT/bench.log" >&2; }

# --- one summary table --------------------------------------------------------------------
"$VENV/bin/python" - "$OUT" "$TEST_RC" "$BENCH_RC" "$GPU" "$DEVICE" "$(( $(date +%s) - START ))" \
    "$REPO/bench/results/gpu_bench-latest.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, test_rc, bench_rc, gpu, device, wall, bench_json = sys.argv[1:8]
counts = {}
failed = []
try:
    for case in ET.parse(Path(out) / "junit.xml").getroot().iter("testcase"):
        name = case.get("name", "")
        ident = name[name.rfind("[") + 1 : -1] if name.endswith("]") else ""
        tokens = ident.split("-")
        variant = ("cuda-emulated" if "cuda-emulated" in ident else "fake" if "fake" in tokens
                   else "cuda" if "cuda" in tokens else "(no device)")
        c = counts.setdefault(variant, {"passed": 0, "failed": 0, "skipped": 0})
        if case.find("failure") is not None or case.find("error") is not None:
            c["failed"] += 1
            failed.append(f"{case.get('classname')}::{name}")
        elif case.find("skipped") is not None:
            c["skipped"] += 1
        else:
            c["passed"] += 1
except (OSError, ET.ParseError) as exc:
    print(f"(no test report: {exc})")
rows = [("tests/gpu " + v, f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped", "", "")
        for v, c in sorted(counts.items())]
bench = Path(bench_json)
if bench_rc == "0" and bench.exists():
    data = json.loads(bench.read_text())
    for r in data["rows"]:
        frac = lambda lim: f"{100 * r['gbps'] / lim:.0f}%" if lim and data.get("real_gpu") else "n/a"
        rows.append((f"bench {r['group']}: {r['what']}", f"{r['gbps']:.2f} GB/s",
                     frac(r["anchor_gbps"]), frac(r["raw_gbps"])))
else:
    rows.append(("bench", "did not run (see bench.log)", "", ""))
print(f"\n## GPU check: {gpu}\n\nBackend: {device}; wall {wall} s\n")
print("| check | result | % of anchor limit | % of this machine's raw |")
print("|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
if failed:
    print("\nFailed tests:\n" + "\n".join(f"- {f}" for f in failed))
print(f"\nLogs: {out}")
EOF
if [ $TEST_RC -ne 0 ] || [ $BENCH_RC -ne 0 ]; then exit 1; fi
exit 0
