"""Training speed per batch size: how long the `minilm` profile's teacher (5 epochs of SST-2 train) would take here.

    python -m benchmarks.train_speed                          # batch 32, 128, 256; 10 + 40 steps each
    python -m benchmarks.train_speed --batch-size 32 128 --steps 10 --warmup-steps 3   # a quick look on a CPU
    python -m benchmarks.train_speed --batch-size 128 --compile    # also the compiled step (torch.compile)

Fine-tunes a fresh copy of the embedded MiniLM-L6 (the teacher's base, mean-pooled) as every stage trains
(`compression.train.finetune`: length-grouped batches, bf16 where native, fused AdamW) on the first
`batch x (warmup + steps)` rows of train, and times the steps after the warm-up ones (lazy CUDA/cuBLAS set-up,
allocator growth). Prints per batch size the steps and rows per second, the projected time of 5 epochs over
all 67,349 rows, and the warm-up's seconds; with `--compile`, a compiled step beside each eager one (its warm-up
holds the compiling, which every training stage would pay again). Issue 13's item 4: on a GPU a step of this
model is host-bound (launches, Python), so a larger batch does the same epoch in fewer steps, and a compiled step
launches fewer kernels; a recipe at a new batch size must be re-chosen on held-out sentences
(`benchmarks/teacher_sweep.py --batch-size`). It is a timing: run it on a quiet machine.
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
    """perf_counter as training begins, and at the end of step `start` and of the last step, each after a
    synchronize on a GPU (only there: a synchronize every step would stop the host from queueing ahead, which is
    what is being timed)."""

    def __init__(self, start: int):
        self.start, self.began, self.t0, self.t1 = start, None, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step not in (self.start, state.max_steps):
            return
        if torch.cuda.is_available() and not args.use_cpu:
            torch.cuda.synchronize()
        if state.global_step == self.start:
            self.t0 = time.perf_counter()
        else:
            self.t1 = time.perf_counter()


def time_steps(
    model, tokenizer, train, batch_size: int, warmup: int, steps: int, compile_step: bool = False
) -> tuple[float, float]:
    """(seconds per training step, seconds of the warm-up) of `model` at `batch_size`: `steps` timed steps after
    `warmup` untimed ones, trained as every stage is (`compression.train.finetune`)."""
    rows = train.select(range(batch_size * (warmup + steps)))
    clock = StepClock(warmup)
    finetune(model, tokenizer, rows, TrainConfig(batch_size=batch_size, epochs=1.0), callbacks=[clock],
             compile_step=compile_step)
    return (clock.t1 - clock.t0) / steps, clock.t0 - clock.began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="SST-2 folder (default: $SST2_DIR, else the hub)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per batch size")
    parser.add_argument("--warmup-steps", type=int, default=10, help="untimed steps first")
    parser.add_argument("--compile", action="store_true",
                        help="also time each batch size with the step compiled (torch.compile via the Trainer)")
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
    print("| batch | step | ms / step | rows / s | 5 epochs of train (s) | warm-up (s) |\n|--:|:--|--:|--:|--:|--:|",
          flush=True)
    for batch_size in args.batch_size:
        for compile_step in (False, True) if args.compile else (False,):
            seconds, warmup_s = time_steps(copy.deepcopy(base), tokenizer, train, batch_size, args.warmup_steps,
                                           args.steps, compile_step)
            rows_per_s = batch_size / seconds
            print(f"| {batch_size} | {'compiled' if compile_step else 'eager'} | {seconds * 1000:.1f} | "
                  f"{rows_per_s:.0f} | {EPOCHS * TRAIN_ROWS / rows_per_s:.0f} | {warmup_s:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
