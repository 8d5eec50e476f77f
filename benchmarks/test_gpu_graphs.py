"""benchmarks/gpu_graphs.py's table, run on the CPU with a tiny model in place of the profile's suite: every fp32
variant gets a row, one `_wo8` row per kernel and one LLM.int8 row at threshold 0; the bnb8 and ONNX variants
none of their own copies."""

from __future__ import annotations

import copy
import sys
from types import SimpleNamespace

from datasets import Dataset

from benchmarks import gpu_graphs
from conftest import make_sentences
from conftest import informative_


def test_dry_run_prints_each_fp32_variant_and_its_wo8_copies(monkeypatch, capsys, tiny_mean_model_session,
                                                             tiny_tokenizer):
    model = copy.deepcopy(tiny_mean_model_session)
    informative_(model, tiny_tokenizer)  # logits far apart, so int8 weights flip none of four sentences
    quantized = copy.deepcopy(model)
    quantized.quantization = ("int8", None)  # stands for the ONNX variant: not timed here
    examples = [dict(tiny_tokenizer([s], return_tensors="pt")) for s, _ in make_sentences(4, seed=4)]
    variants = [SimpleNamespace(name="student", model=model, tokenizer=tiny_tokenizer),
                SimpleNamespace(name="student_int8", model=quantized, tokenizer=tiny_tokenizer)]
    copies = 20  # of the four sentences: 80 validation rows
    validation = Dataset.from_dict({"input_ids": [e["input_ids"][0].tolist() for e in examples] * copies,
                                    "attention_mask": [e["attention_mask"][0].tolist() for e in examples] * copies,
                                    "labels": [0, 1, 0, 1] * copies,
                                    "length": [e["input_ids"].shape[1] for e in examples] * copies})
    suite = SimpleNamespace(run=SimpleNamespace(profile=SimpleNamespace(warmup=1), variants=variants),
                            examples=lambda name: examples, inputs={"student": (validation, examples)})
    monkeypatch.setattr(gpu_graphs, "build_suite", lambda profile, device: suite)
    sizes = []

    def throughput(model, ds, tokenizer):
        sizes.append(len(ds))
        return real_throughput(model, ds, tokenizer)

    real_throughput = gpu_graphs.throughput
    monkeypatch.setattr(gpu_graphs, "throughput", throughput)
    monkeypatch.setattr(sys, "argv", ["gpu_graphs", "--examples", "2"])
    gpu_graphs.main()
    assert sizes == [64] * 4  # --examples 2: throughput over 2 batches of 32 of the 80 validation rows
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| student")]
    assert [r[0].strip() for r in rows] == ["student", "student_wo8 (int8pack)", "student_wo8 (dequant)",
                                            "student_bnb8 (threshold 0)"]
    for name, eager, graphed, fused, compile_s, speedup, graphs, flips, per_s in rows:
        assert float(eager) > 0 and float(graphed) > 0 and graphs.strip() == "0"  # no CUDA: nothing captured
        assert flips.strip() == "0" and float(per_s) > 0
        # --compile's default names the student: it and its dequant copy are timed "compiled", but without CUDA
        # nothing compiles or is captured, and the row says so
        if name.strip() in ("student", "student_wo8 (dequant)"):
            assert fused.strip().endswith("(not compiled)") and float(compile_s) >= 0
        else:
            assert fused.strip() == "" and compile_s.strip() == ""
