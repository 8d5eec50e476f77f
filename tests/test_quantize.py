"""8-bit quantization of the tiny model: fidelity, format, save/load round trips, errors."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from compression.int8 import quantize_rows, snr_db
from compression.artifacts import load_model, save_quantized
from compression.models import linear_layers
from compression.prune import prune_heads_
from compression.quant_onnx import OnnxClassifier
from compression.quantize import Bnb8Config, Int8Config, Wo8Config, backend_name, quantize, quantize_bnb8_
from conftest import informative_

# Floors for the tiny random model's logits against fp32. Int8 of weights alone sits near 40 dB; the dynamic
# activation quantization of ONNX Runtime and LLM.int8's fp16 path cost some of that on random weights.
SNR_FLOOR_DB = {"bnb8": 25.0, "int8": 20.0}

CONFIGS = {"bnb8": Bnb8Config(), "int8": Int8Config(threads=1)}


@pytest.mark.parametrize("kind", ["bnb8", "int8"])
def test_quantized_logits_keep_signal_to_noise(any_tiny_model, tiny_tokenizer, tiny_batch, kind):
    informative_(any_tiny_model, tiny_tokenizer)
    reference = any_tiny_model(**tiny_batch).logits.detach()
    q = quantize(copy.deepcopy(any_tiny_model), CONFIGS[kind])
    with torch.no_grad():
        out = q(**tiny_batch).logits
    assert out.shape == reference.shape
    assert snr_db(reference, out) > SNR_FLOOR_DB[kind]
    # the floor is out of reach of an output that ignores the sentences: all zeros, or their mean for each
    assert snr_db(reference, torch.zeros_like(reference)) < SNR_FLOOR_DB[kind]
    assert snr_db(reference, reference.mean(0).expand_as(reference)) < SNR_FLOOR_DB[kind]


@pytest.mark.parametrize("kind", ["bnb8", "int8"])
def test_save_then_load_gives_identical_logits(any_tiny_model, tiny_tokenizer, tiny_batch, tmp_path, kind):
    q = quantize(any_tiny_model, CONFIGS[kind])
    save_quantized(q, tiny_tokenizer, tmp_path)
    loaded, tokenizer = load_model(tmp_path)
    assert len(tokenizer) == len(tiny_tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(**tiny_batch).logits, q(**tiny_batch).logits)
    assert backend_name(loaded) == backend_name(q)


def test_bnb8_stores_llm_int8_codes_equal_to_the_reference_primitive(tiny_model):
    import bitsandbytes as bnb

    original = tiny_model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    quantize_bnb8_(tiny_model)
    layer = tiny_model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    codes, absmax = quantize_rows(original.half().float())  # LLM.int8 quantizes the fp16 weight
    assert torch.equal(layer.weight.data, codes)
    assert torch.allclose(layer.weight.SCB.float(), absmax)


def test_bnb8_keeps_the_classifier_in_full_precision(tiny_model):
    import bitsandbytes as bnb

    quantize_bnb8_(tiny_model)
    assert type(tiny_model.classifier) is torch.nn.Linear
    assert isinstance(tiny_model.bert.pooler.dense, bnb.nn.Linear8bitLt)


def test_bnb8_drops_only_its_cast_warning(tiny_model, tiny_batch, caplog):
    # the fp32 -> fp16 cast warning of every CPU forward is dropped; the same logger's other warnings are not
    quantize_bnb8_(tiny_model)
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger=logger.name), torch.inference_mode():
        tiny_model(**tiny_batch)
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records if r.name == logger.name] == ["something else"]
    assert logger.level == logging.NOTSET  # the logger's level is left to the user


def test_pruned_then_quantized_round_trips(any_tiny_model, tiny_tokenizer, tiny_batch, tmp_path):
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[1, 2] = keep[3, 0] = False
    prune_heads_(any_tiny_model, keep)
    for kind in ("bnb8", "int8"):
        q = quantize(copy.deepcopy(any_tiny_model), CONFIGS[kind])
        folder = tmp_path / kind
        folder.mkdir()
        save_quantized(q, tiny_tokenizer, folder)
        loaded, _ = load_model(folder)
        with torch.no_grad():
            assert torch.equal(loaded(**tiny_batch).logits, q(**tiny_batch).logits), kind


def test_int8_weights_take_at_most_half_their_fp32_bytes(tiny_model):
    """Embeddings included. (The real model's file sizes are gated in the benchmarks; on a model this small the
    ONNX graph's own bytes would dominate the file.)"""
    import onnx
    from onnx import numpy_helper

    def weight_bytes(model_bytes):
        graph = onnx.load_from_string(model_bytes).graph
        return sum(numpy_helper.to_array(t).nbytes for t in graph.initializer)

    fp32 = sum(p.numel() * 4 for p in tiny_model.parameters())
    q = quantize(tiny_model, CONFIGS["int8"])
    assert weight_bytes(q.onnx_bytes) <= 0.5 * fp32
    embeddings = tiny_model.bert.embeddings.word_embeddings.weight
    graph = onnx.load_from_string(q.onnx_bytes).graph
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)  # ORT stores Gather tables as uint8
    int8_shapes = [tuple(t.dims) for t in graph.initializer if t.data_type in eight_bit]
    assert tuple(embeddings.shape) in int8_shapes


@pytest.mark.parametrize("training", [False, True])
def test_int8_leaves_the_source_model_alone(tiny_model, tiny_batch, training):
    before = tiny_model(**tiny_batch).logits.detach().clone()
    tiny_model.train(training)
    q = quantize(tiny_model, CONFIGS["int8"])
    assert isinstance(q, OnnxClassifier)
    assert tiny_model.training == training  # exported in eval mode, handed back in its own
    assert torch.equal(tiny_model.eval()(**tiny_batch).logits, before)


def test_onnx_model_handles_other_batch_sizes_and_lengths(tiny_model, tiny_tokenizer):
    many = informative_(tiny_model, tiny_tokenizer)  # logits of order 4, both signs

    def close(out, ref):  # within a tenth of the reference's largest logit
        return bool((out - ref).abs().max() <= 0.1 * ref.abs().max())

    q = quantize(copy.deepcopy(tiny_model), CONFIGS["int8"])
    for sentences in (["good"], ["a", "the movie is not very good , too slow and dull"] * 3, many):
        batch = dict(tiny_tokenizer(sentences, padding=True, return_tensors="pt"))
        with torch.no_grad():
            out, ref = q(**batch).logits, tiny_model(**batch).logits
        assert out.shape == (len(sentences), 2)
        assert close(out, ref), (out, ref)
        assert not close(torch.zeros_like(ref), ref)
    # 24 sentences of 3 to 14 tokens in one padded batch: the same answers, and not one answer for all
    assert not close(ref.mean(0).expand_as(ref), ref)
    assert 0 < int(ref.argmax(-1).sum()) < len(many)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("kind", ["bnb8", "int8"])
def test_a_model_without_linear_layers_is_refused(kind):
    model = torch.nn.Sequential(torch.nn.ReLU())
    with pytest.raises(ValueError, match="Sequential has no linear layers to quantize"):
        quantize(model, CONFIGS[kind])


def test_linear_layers_skips_prefixes_only(tiny_model):
    names = [n for n, _ in linear_layers(tiny_model, ("classifier",))]
    assert "classifier" not in names and "bert.pooler.dense" in names
    assert len(names) == 4 * 6 + 1  # q, k, v, attention out, intermediate, output per layer + pooler


def test_unknown_config_is_refused(tiny_model):
    with pytest.raises(ValueError, match="unknown quantization config"):
        quantize(tiny_model, "int4")


@pytest.mark.parametrize("kwargs, cls", [({"threshold": -1.0}, Bnb8Config), ({"threads": 0}, Int8Config)])
def test_configs_validate(kwargs, cls):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        cls(**kwargs)


def test_per_row_embedding_lookup_returns_the_dequantized_rows(tiny_model):
    """The rewritten Gather gives exactly dequantize_rows(quantize_rows(table))[ids]."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from compression.int8 import dequantize_rows
    from compression.quant_onnx import quantize_embedding_rows

    table = tiny_model.bert.embeddings.word_embeddings.weight.detach()
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["out"], axis=0)], "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, table.shape[1]])],
        [numpy_helper.from_array(table.numpy(), "table")],
    )
    # IR 8 is opset 17's: onnx's default is its newest IR, which an older onnxruntime refuses.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    proto = quantize_embedding_rows(model)
    assert [n.op_type for n in proto.graph.node] == ["Gather", "Cast", "Gather", "Mul"]
    ids = torch.tensor([0, 5, 7, 5, table.shape[0] - 1])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"ids": ids.numpy()})
    expected = dequantize_rows(*quantize_rows(table))[ids]
    assert torch.allclose(torch.from_numpy(out), expected, rtol=0, atol=1e-7)


def test_embedding_mode_is_validated():
    with pytest.raises(ValueError, match="embeddings must be one of per-row, per-tensor, fp32, got 'int4'"):
        Int8Config(embeddings="int4")


def test_a_quantized_model_is_not_quantized_again(tiny_model, tiny_batch):
    """Linear8bitLt is an nn.Linear: a second bnb8 pass would requantize its int8 codes as if they were weights."""
    bnb8 = quantize(tiny_model, Bnb8Config())
    with torch.no_grad():
        before = bnb8(**tiny_batch).logits
    for config in (Bnb8Config(), Int8Config(threads=1), Wo8Config()):
        with pytest.raises(ValueError, match="bnb8-quantized already"):
            quantize(bnb8, config)
    with torch.no_grad():
        assert torch.equal(bnb8(**tiny_batch).logits, before)


def test_int8_keeps_its_own_config(tiny_model):
    """The ONNX model must go on saying what it is when its fp32 source is cut afterwards."""
    int8 = quantize(tiny_model, Int8Config(threads=1))
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[0, 0] = False
    prune_heads_(tiny_model, keep)
    assert getattr(int8.config, "kept_heads", None) is None
