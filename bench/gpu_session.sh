#!/usr/bin/env bash
# The GPU evidence of issue #4 and docs/estimates.md, in device calls of under 600 s each
# (the device tool: /work/.library/device/README.md; its image has torch, transformers, peft,
# accelerate, but not bitsandbytes, torchao or pydantic: those travel as wheels).
#
# 1. Here, once (downloads ~49 MB of wheels into the git-ignored .whl/, which `carry` takes along):
#        bash bench/gpu_session.sh wheels
# 2. Then one `run` call per part, each with carry [".whl"] and timeout_s 600, command:
#        bash bench/gpu_session.sh <part>
#    parts (in this order; the first three are docs/estimates.md's chunks):
#        evm-small   bench/estimates_vs_measured.py --models qwen2.5-0.5b,llama-3.2-1b  (train + infer grid)
#        evm-3b      bench/estimates_vs_measured.py --models llama-3.2-3b
#        evm-8b      bench/estimates_vs_measured.py --models llama-3.1-8b
#        throughput  bench/train_throughput.py: llama-3.2-1b lora/qlora/full, reference recipe vs
#                    engine vs engine+chunked loss, batch 4 x 512
#        runs-train  bench/gpu_runs.py: lora, lora-ref, qlora, qlora-ref, full through the executor
#        runs-quant  bench/gpu_runs.py: qat-int8, qat-int4, ptq-nf4, ptq-int8, ptq-torchao-int4
#        tests       pytest -m gpu (the executor's CUDA test, the chunked loss on CUDA)
#    Each part writes its JSON and a log into $OUT, which comes back under the reply's files_at:
#    copy the JSON files into bench/measurements/ and commit them with the figures in the docs.
#    A part cut short keeps what it wrote (every bench saves after each case); estimates_vs_measured
#    lists the cases it skipped for its budget: run them with --models/--only in another call.
# gptqmodel is not carried (compiled CUDA extensions): lora-merge-gptq is recorded as skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-help}
OUT=${OUT:-/tmp/tq-out}
mkdir -p "$OUT"
WHEELS="bitsandbytes==0.50.2 torchao==0.18.0 peft==0.21.2 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5"

setup() {
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "wheel install failed"; exit 3; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "no .whl/: qlora/ptq families need bitsandbytes, gpu_runs needs pydantic (bash bench/gpu_session.sh wheels here)"
    fi
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TUNEQUANT_HOME=/tmp/tq-home
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/machine.txt"
    python3 - <<'EOF' | tee -a "$OUT/machine.txt"
import importlib
for m in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "torchao", "pydantic"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "missing:", type(e).__name__, str(e)[:120])
import torch
print("cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF
}

case "$part" in
    wheels)
        mkdir -p .whl
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
            -d .whl $WHEELS
        du -sh .whl ;;
    evm-small)
        setup
        python3 bench/estimates_vs_measured.py --models qwen2.5-0.5b,llama-3.2-1b --budget-s 480 --out "$OUT" 2>&1 \
            | tee "$OUT/evm-small.log" ;;
    evm-3b)
        setup
        python3 bench/estimates_vs_measured.py --models llama-3.2-3b --budget-s 480 --out "$OUT" 2>&1 \
            | tee "$OUT/evm-3b.log" ;;
    evm-8b)
        setup
        python3 bench/estimates_vs_measured.py --models llama-3.1-8b --budget-s 480 --out "$OUT" 2>&1 \
            | tee "$OUT/evm-8b.log" ;;
    throughput)
        setup
        python3 bench/train_throughput.py --model llama-3.2-1b --batch-size 4 --seq-len 512 \
            --out "$OUT/train-throughput-llama-3.2-1b.json" 2>&1 | tee "$OUT/throughput.log" ;;
    runs-train)
        setup
        python3 bench/gpu_runs.py --families lora,lora-ref,qlora,qlora-ref,full --budget-s 470 \
            --out "$OUT/gpu-runs-train.json" 2>&1 | tee "$OUT/runs-train.log" ;;
    runs-quant)
        setup
        python3 bench/gpu_runs.py --families qat-int8,qat-int4,ptq-nf4,ptq-int8,ptq-torchao-int4 --budget-s 470 \
            --out "$OUT/gpu-runs-quant.json" 2>&1 | tee "$OUT/runs-quant.log" ;;
    tests)
        setup
        python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_runs_executor.py tests/test_stages_loss.py 2>&1 \
            | tee "$OUT/tests-gpu.log" ;;
    *)
        sed -n '2,28p' "$0"; exit 2 ;;
esac
