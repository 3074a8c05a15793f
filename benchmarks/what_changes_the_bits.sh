#!/bin/bash
# What changes a run's bits on this machine? The toy teacher's bootstrap SFT (100 steps, seed 0) once as
# the reference and once per change: the same again (a control that must match), torch's AVX2 kernels
# (ATEN_CPU_CAPABILITY), MKL limited to AVX2 as well, 2 threads instead of 1, and, with
# TRANSFORMERS_WHEEL=<a transformers wheel>, another transformers version. Prints, for each, whether the
# final weights equal the reference's and by how much they differ. docs/results.md has what it printed.
#   bash benchmarks/what_changes_the_bits.sh [work dir]        (uses the sdd and python on PATH or in .venv)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$here/.venv/bin; [ -x "$bin/sdd" ] || bin=$(dirname "$(command -v sdd)")
work=${1:-$(mktemp -d)}
mkdir -p "$work"
if [ -n "${TRANSFORMERS_WHEEL:-}" ]; then
  "$bin/python" -m pip install -q --no-deps --target "$work/other-transformers" "$TRANSFORMERS_WHEEL"
fi

bootstrap() {  # name, then environment assignments for this run
  local name=$1; shift
  env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$@" bash -c "
    '$bin/sdd' toy init '$work/$name' > /dev/null
    '$bin/sdd' sft --run '$work/$name' --name sft-teacher --role teacher --model '$work/$name/toy/teacher-base' \
      --dataset toy-train --set max_steps=100 --set seed=0 > '$work/$name.log' 2>&1"
}

bootstrap reference
bootstrap reference-again
bootstrap aten-avx2 ATEN_CPU_CAPABILITY=avx2
bootstrap mkl-avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
bootstrap threads-2 OMP_NUM_THREADS=2
runs=(reference-again aten-avx2 mkl-avx2 threads-2)
if [ -n "${TRANSFORMERS_WHEEL:-}" ]; then
  bootstrap other-transformers PYTHONPATH="$work/other-transformers"
  runs+=(other-transformers)
fi

"$bin/python" - "$work" "${runs[@]}" <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file

work, runs = Path(sys.argv[1]), sys.argv[2:]

def run(name):
    manifest = json.loads((work / name / "manifest.json").read_text())
    record = manifest["stages"]["sft-teacher"]
    env = record["environment"]
    weights = load_file(work / name / "sft-teacher" / "final" / "model.safetensors")
    losses = [json.loads(line) for line in open(work / name / "sft-teacher" / "log.jsonl")]
    last = [row["loss"] for row in losses if "loss" in row][-1]
    return env, weights, last

env, reference, reference_loss = run("reference")
print(f"reference: transformers {env['versions']['transformers']}, {env.get('cpu_capability')} kernels, "
      f"{env['threads']} thread(s); loss at step 100 {reference_loss:.6f}")
for name in runs:
    env, weights, loss = run(name)
    changed = sum(int((weights[k] != reference[k]).sum()) for k in reference)
    total = sum(reference[k].numel() for k in reference)
    largest = max(float((weights[k].float() - reference[k].float()).abs().max()) for k in reference)
    verdict = "identical" if changed == 0 else f"{changed:,} of {total:,} weights differ, largest by {largest:.3g}"
    print(f"{name}: transformers {env['versions']['transformers']}, {env.get('cpu_capability')} kernels, "
          f"{env['threads']} thread(s): {verdict}; loss at step 100 {loss:.6f}")
EOF
