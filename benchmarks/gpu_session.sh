#!/usr/bin/env bash
# Everything issue 13 measures on a lent GPU, in one device call (its 15 minutes allow about one such call).
#
#   here, once:   SST2_DIR=../shared/data/sst2 python -m benchmarks.gpu_carry        (.gpu_carry, ~56 MiB)
#   device call:  bash benchmarks/gpu_session.sh     carry [".gpu_carry"], timeout_s 600
# (steps 1-4's limits add up to 590 s; an H200 ran the old smoke run, training and measuring, in 131 s)
#
# 1. `compress run --profile smoke --device cuda`: trains the smoke chain cold on the GPU (stage times: item 4)
#    and measures every variant as served there: fp32 and wo8 behind CUDA graphs, bnb8 eagerly, batch 1 and 32.
# 2. `compress baselines --accept` of that run into a copy of baselines.json: this card's absolute budgets.
# 3. `pytest -m gpu --benchmark-autosave` against that copy (the models load from step 1's cache).
# 4. `benchmarks.gpu_graphs`: each variant eager against graphed, and each fp32 model's wo8 copy per kernel
#    (the "before and after" of each technique).
# 5. `benchmarks.train_speed`: the teacher's training step at batch 32, 128 and 256 (item 4's "full profile in
#    minutes"); its 60 s may be cut short by the call's limit, after everything else is safe in $OUT.
# In $OUT (at most 8 files come back): session.log, run/results.{json,md} and pareto.png, the accepted
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
    step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/session.log, remember a failure
        local name=$1 limit=$(($2 * ${SLOWER:-1}))
        shift 2
        echo "== $name (limit ${limit}s): $*"
        local start=$SECONDS
        timeout "$limit" "$@" 2>&1 | tee -a "$out/session.log"
        local code=${PIPESTATUS[0]}
        echo "== $name: exit $code after $((SECONDS - start)) s"
        [ "$code" -eq 0 ] || status=$code
        return "$code"
    }

    step run 300 python3 -m compression.cli run --profile smoke --device "$device" --out "$out/run" || exit "$status"
    cp baselines.json "$out/baselines.json"
    step accept 30 python3 -m compression.cli baselines --accept "$out/run/results.json" --baselines "$out/baselines.json"
    step pytest 150 python3 -m pytest benchmarks -m gpu --benchmark-autosave --baselines "$out/baselines.json" \
        -p no:cacheprovider -q -rs
    saved=$(find .benchmarks -name '*.json' -newer "$out/baselines.json" 2>/dev/null | head -1)
    [ -n "$saved" ] && cp "$saved" "$out/benchmark.json"
    # a CPU dry run times 4 sentences and 4 batches per row: all of them, four copies of each fp32 model, would
    # outlast its limit there (wo8's int8pack kernel is ~14x slower than fp32 on a CPU)
    if [ "$device" = cuda ]; then few=(); else few=(--examples 4); fi
    step graphs 110 python3 -m benchmarks.gpu_graphs --profile smoke "${few[@]}"
    echo "== the run's table"
    cat "$out/run/results.md" 2>/dev/null | head -40
    # last, as it is the one step the device call's 600 s may cut short: training steps per batch size
    if [ "$device" = cuda ]; then speed=(); else speed=(--batch-size 32 128 --steps 4 --warmup-steps 2); fi
    step train 60 python3 -m benchmarks.train_speed "${speed[@]}"
    return "$status"
}

main "$@"
