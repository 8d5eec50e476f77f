"""Per-row symmetric int8: round trips, zeros, idempotence, code range."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.int8 import QMAX, dequantize_rows, quantize_rows, snr_db, step


@st.composite
def matrices(draw):
    rows, cols = draw(st.integers(1, 8)), draw(st.integers(1, 16))
    magnitude = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e3, 1e6]))
    values = draw(st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=rows * cols,
                           max_size=rows * cols))
    w = torch.tensor(values, dtype=torch.float32).view(rows, cols) * magnitude
    w[w.abs() < 1e-30] = 0  # subnormal rows (absmax / 127 underflows) are no weights a model has
    zero_rows = draw(st.lists(st.integers(0, rows - 1), max_size=rows))
    w[zero_rows] = 0
    return w


@settings(max_examples=200, deadline=None)
@given(w=matrices())
def test_round_trip_within_half_a_step(w):
    codes, absmax = quantize_rows(w)
    back = dequantize_rows(codes, absmax)
    tolerance = step(absmax)[:, None] * (0.5 + 1e-5) + 1e-30
    assert (back - w).abs().le(tolerance).all()


@settings(max_examples=200, deadline=None)
@given(w=matrices())
def test_codes_stay_in_range_and_zero_rows_give_zeros(w):
    codes, absmax = quantize_rows(w)
    assert codes.dtype == torch.int8
    assert int(codes.min()) >= -QMAX and int(codes.max()) <= QMAX
    back = dequantize_rows(codes, absmax)
    assert not torch.isnan(back).any()
    zero = (w == 0).all(dim=1)
    assert (codes[zero] == 0).all() and (back[zero] == 0).all() and (absmax[zero] == 0).all()


@settings(max_examples=200, deadline=None)
@given(w=matrices())
def test_quantizing_twice_changes_nothing(w):
    codes, absmax = quantize_rows(w)
    codes2, absmax2 = quantize_rows(dequantize_rows(codes, absmax))
    assert torch.equal(codes, codes2)
    assert torch.allclose(absmax, absmax2, rtol=1e-6, atol=0)


def test_each_nonzero_row_uses_the_full_code_range():
    codes, absmax = quantize_rows(torch.tensor([[0.5, -1.0, 0.25], [3.0, 0.0, -1.5]]))
    assert codes.tolist() == [[64, -127, 32], [127, 0, -64]]
    assert absmax.tolist() == [1.0, 3.0]


def test_only_matrices():
    with pytest.raises(ValueError, match=r"2-D weight, got shape \(3,\)"):
        quantize_rows(torch.ones(3))


def test_snr():
    ref = torch.tensor([1.0, -1.0, 2.0])
    assert snr_db(ref, ref) == math.inf
    assert snr_db(ref, ref * 1.1) == pytest.approx(20.0, abs=1e-4)  # noise is 10% of the signal: 20 dB
