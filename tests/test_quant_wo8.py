"""Int8 weight-only linears: the matmul primitive, the layer, the in-place verb (on the CPU; the GPU's latency is
benchmarks/gpu_graphs.py's)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safetensors.torch import load_file, save_file

from compression import quantize as quantize_module
from compression.artifacts import load_model, save_classifier, save_quantized
from compression.int8 import dequantize_rows, quantize_rows, snr_db, step
from compression.models import count_parameters
from compression.prune import kept_heads, prune_heads_
from compression.quantize import backend_name, quantize
from compression.quant_wo8 import (
    Int8WeightOnlyLinear,
    Wo8Config,
    auto_kernel,
    int8_matmul,
    int8pack_works,
    quantize_wo8_,
)
from conftest import informative_


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 5), k=st.integers(1, 40), n=st.integers(1, 24), seed=st.integers(0, 2**16),
       kernel=st.sampled_from(["int8pack", "dequant"]))
def test_int8_matmul_is_the_matmul_with_the_dequantized_weight(m, k, n, seed, kernel):
    """Both kernels compute x @ dequantize(codes)ᵀ: the only error is the weight's rounding, never the kernel's."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    w[0] = 0.0  # an all-zero row (absmax 0) stays zero
    codes, absmax = quantize_rows(w)
    out = int8_matmul(x, codes, absmax / 127, kernel)
    reference = x.double() @ dequantize_rows(codes, absmax).double().T
    torch.testing.assert_close(out.double(), reference, atol=1e-4, rtol=1e-4)
    assert torch.all(out[:, 0] == 0)
    # against the fp32 weight: off by at most half a step per weight, summed over |x|
    bound = x.abs().double() @ (step(absmax).double() / 2).expand(k, n) + 1e-4
    assert torch.all((out.double() - x.double() @ w.double().T).abs() <= bound)


def test_int8_matmul_keeps_leading_dimensions_and_dtype():
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    codes, absmax = quantize_rows(torch.randn(8, 16))
    for kernel in ("auto", "int8pack", "dequant"):
        out = int8_matmul(x, codes, absmax / 127, kernel)
        assert out.shape == (2, 3, 8) and out.dtype == torch.bfloat16


def test_auto_takes_plain_ops_on_a_cpu_and_the_fused_kernel_elsewhere_where_the_probe_passes(monkeypatch):
    from compression import quant_wo8

    assert int8pack_works("cpu", torch.float32)  # PyTorch has a CPU kernel, yet it is the slower one there
    assert auto_kernel("cpu", torch.float32) == "dequant"
    probed = []
    monkeypatch.setattr(quant_wo8, "int8pack_works", lambda device, dtype: probed.append(device) or device == "cuda")
    assert auto_kernel("cuda", torch.float16) == "int8pack" and auto_kernel("mps", torch.float16) == "dequant"
    assert auto_kernel("cpu", torch.float32) == "dequant" and probed == ["cuda", "mps"]  # the CPU is not probed
    x, (codes, absmax) = torch.randn(2, 16), quantize_rows(torch.randn(8, 16))
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: (calls.append(1), real(*a))[1])
    plain = int8_matmul(x, codes, absmax / 127, "auto")
    assert calls == []  # auto on the CPU ran no fused kernel
    torch.testing.assert_close(int8_matmul(x, codes, absmax / 127, "int8pack"), plain, atol=1e-4, rtol=1e-4)
    assert calls == [1]


def test_layer_matches_its_linear_up_to_the_weights_rounding():
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 10)
    q = Int8WeightOnlyLinear.from_linear(linear)
    x = torch.randn(4, 7, 24)
    with torch.no_grad():
        assert snr_db(linear(x), q(x)) > 35.0
    assert q.codes.dtype == torch.int8 and not q.codes.requires_grad
    assert torch.equal(q.bias, linear.bias.detach())


@pytest.mark.parametrize("kernel", ["auto", "int8pack", "dequant"])
def test_quantized_classifier_keeps_its_logits(any_tiny_model, tiny_tokenizer, tiny_batch, kernel):
    informative_(any_tiny_model, tiny_tokenizer)
    with torch.no_grad():
        reference = any_tiny_model(**tiny_batch).logits
        params = count_parameters(any_tiny_model)
        q = quantize_wo8_(copy.deepcopy(any_tiny_model), Wo8Config(kernel=kernel))
        out = q(**tiny_batch).logits
    assert snr_db(reference, out) > 30.0  # weights alone are rounded: no activation quantization
    assert torch.equal(out.argmax(-1), reference.argmax(-1))
    assert count_parameters(q) == params  # an int8 weight counts once per element, like its fp32 original
    assert q.quantization == ("wo8", Wo8Config(kernel=kernel))


def test_every_linear_but_the_classifier_is_replaced(tiny_model):
    quantize_wo8_(tiny_model)
    linears = [n for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears == ["classifier"]
    assert sum(isinstance(m, Int8WeightOnlyLinear) for m in tiny_model.modules()) == 4 * 6 + 1  # + the pooler


def test_weights_take_a_quarter_of_their_fp32_bytes(tiny_model):
    before = {n: m.weight.nbytes for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize_wo8_(tiny_model)
    for name, m in tiny_model.named_modules():
        if isinstance(m, Int8WeightOnlyLinear):
            assert m.codes.nbytes * 4 == before[name]


def test_the_backend_names_the_kernel_auto_runs_on_the_device(tiny_model, monkeypatch):
    """The results table tells the two kernels apart (they differ in speed): "auto" is named by what it resolves
    to on the model's device, a cast and a matmul on a CPU."""
    model = quantize_wo8_(tiny_model)  # kernel "auto"
    assert backend_name(model) == "int8-weight-only dequant (cpu)"
    monkeypatch.setattr(quantize_module, "auto_kernel", lambda device, dtype: "int8pack")  # as on a GPU with one
    assert backend_name(model) == "int8-weight-only int8pack (cpu)"


def test_kernel_is_validated():
    with pytest.raises(ValueError, match="kernel"):
        Wo8Config(kernel="fast")


@pytest.mark.parametrize("kernel", ["int8pack", "dequant"])
def test_save_and_load_round_trip_a_head_pruned_model(tiny_model, tiny_tokenizer, tiny_batch, tmp_path, kernel):
    """A saved wo8 model (pruned shapes, codes, scales, settings) loads back to the same logits, from safetensors;
    each quantized weight is stored at one byte (plus a float scale per row), everything else as in fp32."""
    if kernel == "int8pack" and not int8pack_works("cpu", torch.float32):
        pytest.skip("no fused int8 kernel in this torch build")
    keep = torch.ones(len(kept_heads(tiny_model)), tiny_model.config.num_attention_heads, dtype=torch.bool)
    keep[0, 1] = False
    prune_heads_(tiny_model, keep)
    save_classifier(tiny_model, tiny_tokenizer, tmp_path / "fp32")
    model = quantize(tiny_model, Wo8Config(kernel=kernel, skip=("classifier", "bert.pooler")))
    save_quantized(model, tiny_tokenizer, tmp_path / "wo8")
    loaded, tokenizer = load_model(tmp_path / "wo8")
    assert loaded.quantization == ("wo8", Wo8Config(kernel=kernel, skip=("classifier", "bert.pooler")))
    assert isinstance(loaded.bert.pooler.dense, torch.nn.Linear) and loaded.config.kept_heads == model.config.kept_heads
    assert len(tokenizer) == len(tiny_tokenizer) and backend_name(loaded) == f"int8-weight-only {kernel} (cpu)"
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**tiny_batch).logits, model(**tiny_batch).logits, rtol=0, atol=0)
    fp32, wo8 = (load_file(tmp_path / d / "model.safetensors") for d in ("fp32", "wo8"))
    codes = [t for name, t in wo8.items() if name.endswith(".codes")]
    assert codes and all(t.dtype == torch.int8 for t in codes)
    nbytes = lambda state: sum(t.numel() * t.element_size() for t in state.values())  # noqa: E731
    assert nbytes(wo8) == nbytes(fp32) - sum(3 * t.numel() - 4 * t.shape[0] for t in codes)


def test_loading_refuses_a_state_of_another_shape(tiny_model, tiny_tokenizer, tmp_path):
    model = quantize(copy.deepcopy(tiny_model), Wo8Config(kernel="dequant"))
    save_quantized(model, tiny_tokenizer, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["bert.encoder.layer.0.attention.self.query.codes"] = state["bert.encoder.layer.0.attention.self.query.codes"][:4]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model(tmp_path)
