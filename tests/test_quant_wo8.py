"""Int8 weight-only linears: the matmul primitive, the layer, the in-place verb (on the CPU; the GPU's latency is
benchmarks/gpu_graphs.py's)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.int8 import dequantize_rows, quantize_rows, snr_db, step
from compression.models import count_parameters
from compression.quant_wo8 import Int8WeightOnlyLinear, Wo8Config, int8_matmul, int8pack_works, quantize_wo8_
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


def test_auto_takes_the_fused_kernel_where_the_probe_passes_and_plain_ops_elsewhere(monkeypatch):
    from compression import quant_wo8

    x, (codes, absmax) = torch.randn(2, 16), quantize_rows(torch.randn(8, 16))
    assert int8pack_works("cpu", torch.float32)  # PyTorch has a CPU kernel
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: (calls.append(1), real(*a))[1])
    fused = int8_matmul(x, codes, absmax / 127, "auto")
    assert len(calls) == 1  # the probe's answer was cached: only the product itself ran
    monkeypatch.setattr(quant_wo8, "int8pack_works", lambda device, dtype: False)
    plain = int8_matmul(x, codes, absmax / 127, "auto")
    assert len(calls) == 1  # no fused kernel where the probe fails
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)


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


def test_kernel_is_validated():
    with pytest.raises(ValueError, match="kernel"):
        Wo8Config(kernel="fast")
