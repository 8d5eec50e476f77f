"""Eager against CUDA-graphed batch-1 latency of every PyTorch variant on a GPU (issue 13's first step).

    python -m benchmarks.gpu_graphs --profile smoke            # on a GPU machine: builds (or loads) the profile

For each fp32 and bnb8 variant: the median batch-1 forward eager and behind `compression.graphs.GraphedClassifier`
(inputs right-padded to 16/32/64/128 tokens), and how many validation sentences the graphed model classifies
differently from the eager one (0 expected: padding is masked). Variants whose capture fails run eagerly, and the
table says so. Without CUDA it runs the same code on the CPU, where the wrapper is the eager model (a dry run).
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from benchmarks.conftest import build_suite
from compression.graphs import GraphConfig, GraphedClassifier
from compression.measure import latency, model_device, to_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke", choices=["smoke", "minilm", "full"])
    parser.add_argument("--repeats", type=int, default=1, help="passes over the timed sentences per median")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    suite = build_suite(args.profile, device)
    warmup = suite.run.profile.warmup
    print(f"device: {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu (dry run: no graphs)'}")
    print("| variant | eager ms | graphed ms | speed-up | graphs | flips vs eager |")
    print("|:--|--:|--:|--:|--:|--:|")
    for v in suite.run.variants:
        if v.name.endswith("_int8"):  # ONNX Runtime on the CPU
            continue
        examples = suite.examples(v.name)
        eager = latency(v.model, examples, warmup, repeats=args.repeats).median
        graphed = GraphedClassifier(v.model, GraphConfig(), pad_token_id=v.tokenizer.pad_token_id or 0)
        fast = latency(graphed, examples, warmup, repeats=args.repeats).median
        dev = model_device(v.model)
        with torch.inference_mode():
            a = np.array([int(v.model(**to_device(e, dev)).logits.argmax()) for e in examples])
            b = np.array([int(graphed(**to_device(e, dev)).logits.argmax()) for e in examples])
        print(f"| {v.name} | {eager:.3f} | {fast:.3f} | {eager / fast:.2f}x | {len(graphed.graphs)} "
              f"| {int((a != b).sum())} |", flush=True)


if __name__ == "__main__":
    main()
