"""compression.measure: accuracy through the packaged metric, flips, ordered predictions, latency, throughput."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.modeling_outputs import SequenceClassifierOutput

from compression import measure
from compression.data import tokenize
from compression.measure import (
    Latency,
    accuracy,
    flips,
    latency,
    model_device,
    model_inputs,
    predict,
    single_examples,
    throughput,
)
from conftest import make_sentences


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeClassifier(torch.nn.Module):
    """Parameterless: class 1 when the first word piece's id is odd. Records the batch sizes it sees."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, int]] = []
        self.kwargs: list[set[str]] = []

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        self.calls.append(tuple(input_ids.shape))
        self.kwargs.append({k for k, v in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids))
                            if v is not None})
        odd = (input_ids[:, 1] % 2).float()
        return SequenceClassifierOutput(logits=torch.stack([1 - odd, odd], dim=-1))


@pytest.fixture(scope="module")
def validation(tiny_tokenizer):
    rows = make_sentences(40, seed=11)
    ds = datasets.Dataset.from_dict({"sentence": [s for s, _ in rows], "label": [label for _, label in rows]})
    return tokenize(ds, tiny_tokenizer)


# --- accuracy and flips ------------------------------------------------------------------------------------


def test_accuracy_known_values():
    assert accuracy(np.array([1, 0, 1, 1]), [1, 0, 0, 1]) == pytest.approx(75.0)
    assert accuracy(np.array([0, 0, 0]), np.array([0, 0, 0])) == pytest.approx(100.0)
    assert accuracy(np.array([1, 1]), [0, 0]) == pytest.approx(0.0)
    assert accuracy(np.array([1, 0, 1, 0, 1, 0, 1, 0]), [1] * 8) == pytest.approx(50.0)


def test_accuracy_uses_packaged_metric_script():
    assert measure.METRIC_SCRIPT.is_file()
    metric = measure._accuracy_metric()
    assert metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])["accuracy"] == pytest.approx(2 / 3)


@settings(max_examples=20, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=40))
def test_accuracy_matches_numpy(pairs):
    preds, refs = np.array([p for p, _ in pairs]), np.array([r for _, r in pairs])
    assert accuracy(preds, refs) == pytest.approx(100.0 * float((preds == refs).mean()))


def test_flips():
    assert flips(np.array([0, 1, 1, 0]), np.array([0, 1, 1, 0])) == 0
    assert flips(np.array([0, 1, 1, 0]), np.array([1, 1, 0, 0])) == 2
    assert flips([1, 1, 1], [0, 0, 0]) == 3
    assert isinstance(flips([1], [0]), int)


# --- predict -----------------------------------------------------------------------------------------------


def test_predict_returns_dataset_order_fake_model(validation, tiny_tokenizer):
    model = FakeClassifier()
    preds = predict(model, validation, tiny_tokenizer, batch_size=8)
    expected = np.array([ids[1] % 2 for ids in validation["input_ids"]])
    assert preds.dtype == np.int64 and preds.shape == (len(validation),)
    np.testing.assert_array_equal(preds, expected)
    # batches were length-sorted: padded widths never decrease
    widths = [w for _, w in model.calls]
    assert widths == sorted(widths) and len(set(widths)) > 1
    assert sum(b for b, _ in model.calls) == len(validation)


def test_predict_matches_per_example_loop(tiny_model, validation, tiny_tokenizer):
    preds = predict(tiny_model, validation, tiny_tokenizer, batch_size=16)
    expected, margins = [], []
    with torch.no_grad():
        for row in validation:
            inputs = {k: torch.tensor([row[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
            logits = tiny_model(**inputs).logits[0]
            expected.append(int(logits.argmax()))
            margins.append(float((logits[0] - logits[1]).abs()))
    clear = np.array(margins) > 1e-4  # only rows that padding noise cannot flip
    assert clear.sum() >= len(validation) - 2
    np.testing.assert_array_equal(preds[clear], np.array(expected)[clear])


def test_model_inputs_drops_bookkeeping():
    batch = {"input_ids": torch.ones(1, 2), "attention_mask": torch.ones(1, 2), "index": torch.tensor([3]),
             "labels": torch.tensor([1]), "length": torch.tensor([2])}
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask"}


def test_single_examples(validation, tiny_tokenizer):
    examples = single_examples(validation, tiny_tokenizer, limit=5)
    assert len(examples) == 5
    for i, e in enumerate(examples):
        assert "index" not in e and "labels" not in e
        assert e["input_ids"].shape == (1, validation[i]["length"])
        assert e["input_ids"][0].tolist() == validation[i]["input_ids"]
    assert len(single_examples(validation, tiny_tokenizer)) == len(validation)
    assert len(single_examples(validation, tiny_tokenizer, limit=1000)) == len(validation)


# --- latency, throughput, device ---------------------------------------------------------------------------


def _fake_clock(monkeypatch, durations_ms):
    """perf_counter in compression.measure returns start/end pairs `durations_ms` apart."""
    ticks = []
    now = 100.0
    for d in durations_ms:
        ticks += [now, now + d / 1000.0]
        now += 1.0
    it = iter(ticks)
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: next(it)))


def test_latency_fake_model_and_clock(monkeypatch, validation, tiny_tokenizer):
    examples = single_examples(validation, tiny_tokenizer, limit=5)
    durations = [float(d) for d in (5, 1, 9, 3, 7, 2, 10, 4, 8, 6)]  # 5 examples x 2 repeats
    _fake_clock(monkeypatch, durations)
    model = FakeClassifier()
    lat = latency(model, examples, warmup=3, repeats=2, warmup_seconds=0)
    assert isinstance(lat, Latency)
    assert lat.samples == 10
    assert lat.median == pytest.approx(statistics.median(durations))
    assert lat.p90 == pytest.approx(statistics.quantiles(durations, n=10, method="inclusive")[8])
    assert lat.p90 >= lat.median
    assert len(model.calls) == 3 + 10  # warmup runs are not timed but do run
    assert all(b == 1 for b, _ in model.calls)


def test_latency_real_clock(validation, tiny_tokenizer):
    examples = single_examples(validation, tiny_tokenizer, limit=6)
    lat = latency(FakeClassifier(), examples, warmup=2, repeats=3)
    assert lat.samples == 18
    assert lat.median > 0 and lat.p90 >= lat.median


def test_latency_single_sample(monkeypatch, validation, tiny_tokenizer):
    _fake_clock(monkeypatch, [4.0])
    lat = latency(FakeClassifier(), single_examples(validation, tiny_tokenizer, limit=1), warmup=0, warmup_seconds=0)
    assert lat == Latency(median=pytest.approx(4.0), p90=pytest.approx(4.0), samples=1)


def test_latency_p90_within_measured_range_for_few_samples(monkeypatch, validation, tiny_tokenizer):
    _fake_clock(monkeypatch, [1.0, 2.0])
    lat = latency(FakeClassifier(), single_examples(validation, tiny_tokenizer, limit=2), warmup=0, warmup_seconds=0)
    assert lat.median == pytest.approx(1.5)
    assert 1.5 <= lat.p90 <= 2.0


def test_latency_tiny_model(tiny_model, validation, tiny_tokenizer):
    lat = latency(tiny_model, single_examples(validation, tiny_tokenizer, limit=4), warmup=1, repeats=2)
    assert lat.samples == 8 and 0 < lat.median <= lat.p90


def test_latency_needs_examples():
    with pytest.raises(ValueError, match="at least one example"):
        latency(FakeClassifier(), [])


def test_throughput_positive(tiny_model, validation, tiny_tokenizer):
    assert throughput(tiny_model, validation, tiny_tokenizer, batch_size=16) > 0


def test_throughput_counts_examples(monkeypatch, validation, tiny_tokenizer):
    ticks = iter([10.0, 12.0])  # the timed loop takes 2 s
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    model = FakeClassifier()
    assert throughput(model, validation, tiny_tokenizer, batch_size=16) == pytest.approx(len(validation) / 2.0)
    assert len(model.calls) == 1 + 3  # one untimed warm-up batch, then 40 rows in batches of 16


def test_model_device():
    assert model_device(FakeClassifier()) == torch.device("cpu")
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
