#!/usr/bin/env bash
# Everything issue 13 measures on a lent GPU, in one device call (its 15 minutes allow about one such call).
#
#   here, once:   SST2_DIR=../shared/data/sst2 python -m benchmarks.gpu_carry        (.gpu_carry, ~56 MiB)
#   device call:  bash benchmarks/gpu_session.sh     carry [".gpu_carry"], timeout_s 600
#
# Steps (STEPS="..." picks some, in this order; default all):
# - run: `compress run --profile smoke --device cuda` trains the smoke chain cold on the GPU (~60 s on an H200)
#   and measures every variant as served there: fp32 and wo8 behind CUDA graphs, bnb8 eagerly, batch 1 and 32
#   (~4 min on an H200: each eager bnb8 row takes 30-55 s).
# - accept: `compress baselines --accept` of that run into $OUT's copy of baselines.json: this card's budgets.
# - pytest: `pytest -m gpu --benchmark-autosave` against that copy (the models come from the run's cache, or are
#   trained here when the run step was left out: ~60 s).
# - graphs: `benchmarks.gpu_graphs`: each variant eager, graphed, and (teacher, student and their served wo8
#   copies) compiled + graphed; each fp32 model's wo8 copy per kernel: the "before and after" of each technique.
# - train: `benchmarks.train_speed --compile`, the teacher's training step at batch 32, 128 and 256, eager and
#   compiled (each row printed as it is timed); last, as the call's limit may cut it short, after everything else
#   is safe in $OUT. The CPU dry run leaves the compiled rows out (inductor takes ~80 s per row here).
# All five would take ~11-13 minutes on an H200 from cold (estimated from session 21's calls; graphs untimed
# there), more than one call's 600 s. On a card whose budgets baselines.json already holds (NVIDIA H200,
# gpu.smoke), `STEPS="pytest graphs train"` is the issue's "Done when" in an estimated 6-8 minutes; on a new card,
# `STEPS="run accept pytest"` first (~8 minutes, estimated), then graphs and train if time is left.
# In $OUT (at most 8 files come back): session.log, run/results.{json,md} and pareto.png, the (accepted)
# baselines.json and the saved benchmark.json; the last lines printed are the tables.
# DEVICE=cpu runs the same steps on a CPU (a dry run of the plumbing: no graphs, no wo8 rows, gpu tests skip);
# SLOWER=k multiplies every step's time limit by k (2-core CPUs of this kind build and measure the smoke run in
# 5.5-9.5 minutes from a warm cache here, SLOWER=3; up to 2.5x that on slower ones: SLOWER=6 there).
set -uo pipefail

main() {  # the whole script is read before it runs: editing the file mid-run cannot change what runs
    cd "$(dirname "$0")/.."
    device="${DEVICE:-cuda}"
    out="${OUT:-/tmp/gpu-session}"
    mkdir -p "$out"
    if [ "$device" = cuda ]; then
        source benchmarks/gpu_setup.sh || exit 1
        nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
    fi
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 COMPRESSION_CACHE="${COMPRESSION_CACHE:-/tmp/gpu-session-cache}"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    status=0
    steps=" ${STEPS:-run accept pytest graphs train} "
    for name in $steps; do
        case "$name" in run|accept|pytest|graphs|train) ;; *) echo "STEPS: unknown step $name" >&2; exit 2 ;; esac
    done
    cp baselines.json "$out/baselines.json"
    step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/session.log, remember a failure
        local name=$1 limit=$(($2 * ${SLOWER:-1}))
        shift 2
        if [[ "$steps" != *" $name "* ]]; then echo "== $name: not in STEPS"; return 0; fi
        echo "== $name (limit ${limit}s): $*"
        local start=$SECONDS
        timeout "$limit" "$@" 2>&1 | tee -a "$out/session.log"
        local code=${PIPESTATUS[0]}
        echo "== $name: exit $code after $((SECONDS - start)) s"
        [ "$code" -eq 0 ] || status=$code
        return "$code"
    }

    step run 360 python3 -m compression.cli run --profile smoke --device "$device" --out "$out/run" || exit "$status"
    step accept 30 python3 -m compression.cli baselines --accept "$out/run/results.json" --baselines "$out/baselines.json"
    step pytest 240 python3 -m pytest benchmarks -m gpu --benchmark-autosave --baselines "$out/baselines.json" \
        -p no:cacheprovider -q -rs
    saved=$(find .benchmarks -name '*.json' -newer "$out/baselines.json" 2>/dev/null | head -1)
    [ -n "$saved" ] && cp "$saved" "$out/benchmark.json"
    # a CPU dry run times 4 sentences and 4 batches per row: all of them, four copies of each fp32 model, would
    # outlast its limit there (wo8's int8pack kernel is ~14x slower than fp32 on a CPU)
    if [ "$device" = cuda ]; then few=(); else few=(--examples 4); fi
    step graphs 200 python3 -m benchmarks.gpu_graphs --profile smoke "${few[@]}"
    echo "== the run's table"
    cat "$out/run/results.md" 2>/dev/null | head -40
    # last, as it is the one step the device call's 600 s may cut short: training steps per batch size
    if [ "$device" = cuda ]; then speed=(--compile); else speed=(--batch-size 32 128 --steps 4 --warmup-steps 2); fi
    step train 150 python3 -m benchmarks.train_speed "${speed[@]}"
    return "$status"
}

main "$@"
