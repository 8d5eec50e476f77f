"""Eager against CUDA-graphed batch-1 latency of every PyTorch variant on a GPU (issue 13's first step).

    python -m benchmarks.gpu_graphs --profile smoke            # on a GPU machine: builds (or loads) the profile

For each fp32 and bnb8 variant: the median batch-1 forward eager and behind `compression.graphs.GraphedClassifier`
(inputs right-padded to 16/32/64/128 tokens), and how many validation sentences the graphed model classifies
differently from the eager one (0 expected: padding is masked), and the graphed model's throughput at batch 32
over all of validation (length-sorted batches, as `compress run` measures it). Variants whose capture fails run
eagerly, and the table says so. Each fp32 variant is also measured as `_wo8`, the second 8-bit path
(`compression.quant_wo8`: int8 weight-only linears, once with each kernel), and as LLM.int8 at threshold 0 (no
outlier decomposition: the form of bnb8 a graph can hold), their flips counted against the fp32 model's eager
predictions.
The variants named by `--compile` (default: teacher and student, the ones issue 13 sets targets for), and their
wo8 copies with the kernel a run serves there (`quant_wo8.auto_kernel`), are also timed compiled and then graphed
(`GraphConfig(compile=True)`, batch 1 only: each batch size is its own compilation); "compile s" is the first
call's wall time, compilation and captures included.
Without CUDA it runs the same code on the CPU, where the wrapper is the eager model (a dry run: nothing compiles).
"""

from __future__ import annotations

import argparse
import copy
import logging
import time

import numpy as np
import torch

from benchmarks.conftest import build_suite
from compression.graphs import SERVING, GraphConfig, GraphedClassifier
from compression.measure import latency, model_device, throughput, to_device
from compression.quant_bnb8 import Bnb8Config, quantize_bnb8_
from compression.quant_wo8 import Wo8Config, auto_kernel, quantize_wo8_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke", choices=["smoke", "minilm", "full"])
    parser.add_argument("--repeats", type=int, default=1, help="passes over the timed sentences per median")
    parser.add_argument("--examples", type=int, default=None, help="time only the first N of the profile's timed "
                        "sentences, and batch-32 throughput over the first N batches of validation (a quick dry run "
                        "on the CPU); default: all of them")
    parser.add_argument("--compile", nargs="*", default=["teacher", "student"], metavar="VARIANT",
                        help="fp32 variants also timed compiled + graphed, with their served wo8 copies (default: "
                        "teacher student; none without names): each costs a compilation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    suite = build_suite(args.profile, device)
    warmup = suite.run.profile.warmup
    print(f"device: {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu (dry run: no graphs)'}")
    print("| variant | eager ms | graphed ms | compiled + graphed ms | compile s | speed-up | graphs | flips vs eager "
          "| batch 32 /s |")
    print("|:--|--:|--:|--:|--:|--:|--:|--:|--:|")
    for v in suite.run.variants:
        if v.name.endswith("_int8"):  # ONNX Runtime on the CPU
            continue
        examples = suite.examples(v.name)[: args.examples]
        validation = suite.inputs[v.name][0]
        if args.examples is not None:  # on a CPU the int8pack kernel runs ~14x slower than fp32: all 872 take minutes
            validation = validation.select(range(min(len(validation), 32 * args.examples)))
        pad = v.tokenizer.pad_token_id or 0
        models = [(v.name, v.model)]
        if getattr(v.model, "quantization", None) is None:
            # fp32: also its int8 weight-only copies, and LLM.int8 without the outlier decomposition (capturable)
            models += [(f"{v.name}_wo8 ({kernel})", quantize_wo8_(copy.deepcopy(v.model), Wo8Config(kernel=kernel)))
                       for kernel in ("int8pack", "dequant")]
            models.append((f"{v.name}_bnb8 (threshold 0)",
                           quantize_bnb8_(copy.deepcopy(v.model), Bnb8Config(threshold=0.0))))
        dev = model_device(v.model)
        served_kernel = auto_kernel(dev.type, torch.float32)  # the wo8 kernel `compress run` serves here
        with torch.inference_mode():
            reference = np.array([int(v.model(**to_device(e, dev)).logits.argmax()) for e in examples])
        for name, model in models:
            try:
                eager = latency(model, examples, warmup, repeats=args.repeats).median
            except (RuntimeError, NotImplementedError) as error:  # e.g. no fused int8 kernel on this device
                print(f"| {name} | {str(error).splitlines()[0][:60]} | | | | | | | |", flush=True)
                continue
            graphed = GraphedClassifier(model, SERVING, pad_token_id=pad)
            graphed_ms = latency(graphed, examples, warmup, repeats=args.repeats).median
            best, best_ms, fused, compile_s = graphed, graphed_ms, "", ""
            if v.name in args.compile and (name == v.name or name.endswith(f"({served_kernel})")):
                best = GraphedClassifier(model, GraphConfig(batch_sizes=(1,), compile=True), pad_token_id=pad)
                start = time.perf_counter()
                latency(best, examples, warmup=0, warmup_seconds=0)  # compiles, and captures every bucket used
                compile_s = f"{time.perf_counter() - start:.1f}"
                compiled_ms = latency(best, examples, warmup, repeats=args.repeats).median
                fused = f"{compiled_ms:.3f}" + ("" if best.compiled is not None and best.graphs else " (not compiled)")
                best_ms = min(best_ms, compiled_ms)
            with torch.inference_mode():
                flips = int((np.array([int(best(**to_device(e, dev)).logits.argmax()) for e in examples])
                             != reference).sum())
            per_s = throughput(graphed, validation, v.tokenizer)
            print(f"| {name} | {eager:.3f} | {graphed_ms:.3f} | {fused} | {compile_s} | {eager / best_ms:.2f}x | "
                  f"{len(graphed.graphs)} | {flips} | {per_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
