"""Which 8-bit path is fastest on this CPU? Every candidate on the same fp32 models, batch 1 and 32.

    pip install -e ".[compare]"   # torchao, for its two rows
    python benchmarks/int8_backends.py --model ~/.cache/model-compression/teacher-<key> [--model ...]

For each model: validation accuracy (all 872 sentences), batch-1 latency (median and p90 over `--examples`
validation sentences after warm-up), batch-32 throughput, with a fixed thread count, and "train flips": how
many of `--fidelity` train sentences get a different prediction than in fp32, a label-free measure of how
faithful each path is that does not use the validation split. Backends:
PyTorch fp32; torch dynamic int8 (`torch.ao.quantization.quantize_dynamic`, deprecated but present); torchao
int8 dynamic-activation/int8-weight, eager and under `torch.compile`; ONNX Runtime fp32; ONNX Runtime dynamic int8
(per-channel weights with per-row int8 embeddings, the `Int8Config` default; per-tensor weights with
per-row, ORT's per-tensor, or fp32 embeddings). A backend that fails is reported,
not fatal. Run it alone on the machine: the figures are compared side by side within one run.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from compression.data import load_sst2, tokenize
from compression.measure import accuracy, flips, latency, predict, single_examples, throughput
from compression.artifacts import load_model
from compression.quant_onnx import Int8Config, OnnxClassifier, export_onnx, quantize_int8


def torch_dynamic(model):
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def torchao_int8(model, compile_: bool):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    q = copy.deepcopy(model)
    quantize_(q, Int8DynamicActivationInt8WeightConfig())
    return torch.compile(q, dynamic=True) if compile_ else q


def onnx_fp32(model):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fp32.onnx"
        export_onnx(model, path)
        return OnnxClassifier(path.read_bytes(), model.config)


BACKENDS = {
    "pytorch fp32": lambda m: m,
    "torch dynamic int8": torch_dynamic,
    "torchao int8 (eager)": lambda m: torchao_int8(m, False),
    "torchao int8 (torch.compile)": lambda m: torchao_int8(m, True),
    "onnxruntime fp32": onnx_fp32,
    "onnxruntime int8 per tensor, embeddings per row": lambda m: quantize_int8(m, Int8Config(per_channel=False)),
    "onnxruntime int8 per tensor, embeddings per tensor":
        lambda m: quantize_int8(m, Int8Config(per_channel=False, embeddings="per-tensor")),
    "onnxruntime int8 per tensor, embeddings fp32":
        lambda m: quantize_int8(m, Int8Config(per_channel=False, embeddings="fp32")),
    "onnxruntime int8 per channel, embeddings per row (default)": lambda m: quantize_int8(m, Int8Config()),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, type=Path, help="saved fp32 model folder")
    parser.add_argument("--data", default=None, help="SST-2 folder (default: $SST2_DIR)")
    parser.add_argument("--examples", type=int, default=300, help="validation sentences timed at batch 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="backend names to run (default: all)")
    parser.add_argument("--fidelity", type=int, default=3000,
                        help="train sentences (8+ words, seed 0) on which to count flips against fp32")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    sst2 = load_sst2(args.data)
    print(f"threads={torch.get_num_threads()}  torch {torch.__version__}")
    print("| model | backend | val acc (%) | Δ acc vs fp32 | train flips | b1 median (ms) | b1 p90 (ms) | b32 (ex/s) "
          "| prep (s) |")
    print("|:--|:--|--:|--:|--:|--:|--:|--:|--:|")
    train = sst2.splits["train"]
    # Label-free fidelity on train: a choice of int8 path must not rest on the validation split it is reported on.
    long_rows = np.flatnonzero(np.array([len(s.split()) >= 8 for s in train["sentence"]]))
    fidelity_rows = np.random.default_rng(0).choice(long_rows, min(args.fidelity, len(long_rows)), replace=False)
    fidelity_rows = sorted(fidelity_rows.tolist())
    for folder in args.model:
        model, tokenizer = load_model(folder)
        model = model.cpu().eval()
        val = tokenize(sst2.splits["validation"], tokenizer)
        examples = single_examples(val, tokenizer, args.examples)
        fidelity = tokenize(train.select(fidelity_rows), tokenizer)
        base_acc = base_train = None
        for name, make in BACKENDS.items():
            if args.only and name not in args.only:
                continue
            try:
                start = time.perf_counter()
                q = make(model)
                preds = predict(q, val, tokenizer)  # also triggers compilation before timing
                prep = time.perf_counter() - start
                acc = accuracy(preds, val["labels"])
                base_acc = acc if base_acc is None else base_acc
                train_preds = predict(q, fidelity, tokenizer)
                base_train = train_preds if base_train is None else base_train
                lat = latency(q, examples, warmup=30)
                tput = throughput(q, val, tokenizer, 32)
                print(f"| {folder.name.split('-')[0]} | {name} | {acc:.2f} | {acc - base_acc:+.2f} | "
                      f"{flips(train_preds, base_train)} | {lat.median:.2f} | {lat.p90:.2f} | {tput:.0f} | "
                      f"{prep:.0f} |", flush=True)
            except Exception as err:  # a backend missing or failing here is a row, not the end of the table
                print(f"| {folder.name.split('-')[0]} | {name} | failed: {type(err).__name__}: "
                      f"{str(err).splitlines()[0][:80]} | | | | | | |", flush=True)


if __name__ == "__main__":
    main()
