#!/usr/bin/env bash
# Every GPU benchmark in one command, for a lent GPU machine without network access:
#   bash benchmarks/run_gpu.sh
# 1. gpu_memory.py: one training step's peak memory, stage 1 and 2, with and without gradient
#    checkpointing, Flan-T5-XL and 7B Llama shapes, beside memory_plan.py's computed figures, at
#    batch 8 (one GPU) and batch 1 (what each of 8 DDP processes holds at global batch 8);
# 2. stages.py: stage-1/stage-2 training throughput on Flan-T5-XL, ours vs plain HF;
# 3. gpu_throughput.py: verbalizer scoring throughput.
# Results go to $OUT when set (else benchmarks/results/), a log of each beside them. Wheels in
# .whl/ are installed first when present: lion-pytorch is not in the GPU image; fetch it here with
#   pip download --no-deps --only-binary=:all: -d .whl lion-pytorch
# A benchmark that fails does not stop the next ones; the exit status says whether any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
logs=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
failed=0
python3 benchmarks/gpu_memory.py 2>&1 | tee "$logs/gpu-memory.log" || failed=1
python3 benchmarks/gpu_memory.py --batch-size 1 --out "$logs/gpu-memory-batch1.json" 2>&1 | tee "$logs/gpu-memory-batch1.log" || failed=1
python3 benchmarks/stages.py --device cuda --model flan-t5-xl --steps 10 2>&1 | tee "$logs/stages-cuda.log" || failed=1
python3 benchmarks/gpu_throughput.py --requests 32 2>&1 | tee "$logs/gpu_throughput.log" || failed=1
exit $failed
