"""Training speed per batch size: how long the `minilm` profile's teacher (5 epochs of SST-2 train) would take here.

    python -m benchmarks.train_speed                          # batch 32, 128, 256; 10 + 40 steps each
    python -m benchmarks.train_speed --batch-size 32 128 --steps 10 --warmup-steps 3   # a quick look on a CPU

Fine-tunes a fresh copy of the embedded MiniLM-L6 (the teacher's base, mean-pooled) as every stage trains
(`compression.train.finetune`: length-grouped batches, bf16 where native, fused AdamW) on the first
`batch x (warmup + steps)` rows of train, and times the steps after the warm-up ones (lazy CUDA/cuBLAS set-up,
allocator growth). Prints per batch size the steps and rows per second and the projected time of 5 epochs
over all 67,349 rows. Issue 13's item 4: on a GPU a step of this model is host-bound (launches, Python), so a
larger batch does the same epoch in fewer steps; a recipe at a new batch size must be re-chosen on held-out
sentences (`benchmarks/teacher_sweep.py --batch-size`). It is a timing: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time

import torch
from transformers import TrainerCallback

from compression.data import load_sst2, tokenize
from compression.models import load_base
from compression.train import TrainConfig, finetune

TRAIN_ROWS = 67_349  # SST-2 train
EPOCHS = 5  # the minilm profile's teacher


class StepClock(TrainerCallback):
    """perf_counter at the end of step `start` and of the last step, each after a synchronize on a GPU (only
    there: a synchronize every step would stop the host from queueing ahead, which is what is being timed)."""

    def __init__(self, start: int):
        self.start, self.t0, self.t1 = start, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step not in (self.start, state.max_steps):
            return
        if torch.cuda.is_available() and not args.use_cpu:
            torch.cuda.synchronize()
        if state.global_step == self.start:
            self.t0 = time.perf_counter()
        else:
            self.t1 = time.perf_counter()


def time_steps(model, tokenizer, train, batch_size: int, warmup: int, steps: int) -> float:
    """Seconds per training step of `model` at `batch_size`, over `steps` steps after `warmup` untimed ones,
    trained as every stage is (`compression.train.finetune`)."""
    rows = train.select(range(batch_size * (warmup + steps)))
    clock = StepClock(warmup)
    finetune(model, tokenizer, rows, TrainConfig(batch_size=batch_size, epochs=1.0), callbacks=[clock])
    return (clock.t1 - clock.t0) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="SST-2 folder (default: $SST2_DIR, else the hub)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per batch size")
    parser.add_argument("--warmup-steps", type=int, default=10, help="untimed steps first")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 1 or min(args.batch_size) < 1:
        parser.error("--steps, --warmup-steps and every --batch-size must be >= 1")
    logging.basicConfig(level=logging.WARNING)

    base, tokenizer = load_base(None, pooling="mean")
    train = tokenize(load_sst2(args.data).splits["train"], tokenizer, TrainConfig().max_length)
    need = max(args.batch_size) * (args.warmup_steps + args.steps)
    if need > len(train):
        parser.error(f"batch {max(args.batch_size)} x {args.warmup_steps + args.steps} steps needs {need} rows; "
                     f"train has {len(train)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}: {args.steps} timed steps after "
          f"{args.warmup_steps}", flush=True)
    print("| batch | ms / step | rows / s | 5 epochs of train (s) |\n|--:|--:|--:|--:|", flush=True)
    for batch_size in args.batch_size:
        seconds = time_steps(copy.deepcopy(base), tokenizer, train, batch_size, args.warmup_steps, args.steps)
        rows_per_s = batch_size / seconds
        print(f"| {batch_size} | {seconds * 1000:.1f} | {rows_per_s:.0f} | {EPOCHS * TRAIN_ROWS / rows_per_s:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
