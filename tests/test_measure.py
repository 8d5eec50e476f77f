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
    accepted_inputs,
    accuracy,
    e2e_latency,
    flips,
    latency,
    model_device,
    model_inputs,
    paired_latency,
    predict,
    predict_single,
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


class WidthParityClassifier(FakeClassifier):
    """Class 1 when the call's padded width is odd: a sentence's output depends on the batch it is in."""

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        super().forward(input_ids, attention_mask, token_type_ids)
        self.ids = getattr(self, "ids", []) + [input_ids.tolist()]
        odd = float(input_ids.shape[1] % 2)
        return SequenceClassifierOutput(logits=torch.tensor([[1 - odd, odd]] * input_ids.shape[0]))


class NoTokenTypes(torch.nn.Module):
    """A DistilBERT-like signature: passing token_type_ids is a TypeError."""

    def forward(self, input_ids, attention_mask=None):
        return SequenceClassifierOutput(logits=torch.zeros(input_ids.shape[0], 2))


@pytest.fixture(scope="module")
def sentences():
    return [s for s, _ in make_sentences(40, seed=11)]


@pytest.fixture(scope="module")
def validation(tiny_tokenizer, sentences):
    rows = make_sentences(40, seed=11)
    ds = datasets.Dataset.from_dict({"sentence": sentences, "label": [label for _, label in rows]})
    return tokenize(ds, tiny_tokenizer)


def split_decisions(model, sentences, tokenizer) -> float:
    """Point a random model's classifier along its features' main direction of variation and put the decision
    in the middle half's widest gap, so it answers both classes with no row near a tie. Returns the smallest
    margin (logit difference).

    A random classifier gives nearly the same logits to every sentence: one class for all, or ties.
    """
    features = []
    hook = model.classifier.register_forward_hook(lambda m, args, out: features.append(args[0][0]))
    with torch.no_grad():
        for s in sentences:
            model(**tokenizer(s, return_tensors="pt"))
        hook.remove()
        f = torch.stack(features)  # [N, H]
        direction = torch.linalg.svd(f - f.mean(0), full_matrices=False).Vh[0]  # [H]
        direction *= 10.0 / (f @ direction).std()
        model.classifier.weight.copy_(torch.stack([-direction, direction]) / 2)
        model.classifier.bias.zero_()
        diff = (f @ direction).sort().values  # [N] logit of class 1 minus class 0
        k = max(range(len(diff) // 4, 3 * len(diff) // 4), key=lambda i: diff[i + 1] - diff[i])
        model.classifier.bias.copy_(torch.stack([diff[k] + diff[k + 1], -(diff[k] + diff[k + 1])]) / 4)
        return float(diff[k + 1] - diff[k]) / 2


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


def test_predict_matches_per_example_loop(tiny_model, validation, sentences, tiny_tokenizer):
    # (the random model answers one class for every row, and a wrong order or a constant would match that)
    assert split_decisions(tiny_model, sentences, tiny_tokenizer) > 1e-2
    preds = predict(tiny_model, validation, tiny_tokenizer, batch_size=16)
    expected = []
    with torch.no_grad():
        for row in validation:
            inputs = {k: torch.tensor([row[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
            expected.append(int(tiny_model(**inputs).logits[0].argmax()))
    assert 0 < sum(expected) < len(expected)
    np.testing.assert_array_equal(preds, np.array(expected))


# --- predict_single: one raw sentence per call, as deployed ----------------------------------------------------


def test_predict_single_equals_predict_for_fp32(any_tiny_model, validation, sentences, tiny_tokenizer):
    assert split_decisions(any_tiny_model, sentences, tiny_tokenizer) > 1e-2  # far beyond fp32 padding noise
    batched = predict(any_tiny_model, validation, tiny_tokenizer, batch_size=16)
    single = predict_single(any_tiny_model, sentences, tiny_tokenizer)
    assert single.dtype == np.int64 and single.shape == (len(sentences),)
    assert 0 < single.sum() < len(sentences)  # both classes: a constant answer would not show the order
    np.testing.assert_array_equal(single, batched)


def test_predict_single_runs_each_sentence_alone_unpadded_in_order(validation, sentences, tiny_tokenizer):
    model = WidthParityClassifier()
    single = predict_single(model, sentences, tiny_tokenizer)
    lengths = validation["length"]
    np.testing.assert_array_equal(single, np.array(lengths) % 2)  # each call as wide as its own sentence
    assert model.calls == [(1, n) for n in lengths]
    assert [ids[0] for ids in model.ids] == validation["input_ids"]  # the deployed tokenization, in order
    # the same model batched answers differently: the fake really does depend on batch composition
    assert (predict(WidthParityClassifier(), validation, tiny_tokenizer, batch_size=8) != single).any()


def test_predict_single_truncates_to_max_length(tiny_tokenizer):
    model = WidthParityClassifier()
    predict_single(model, [" ".join(["good"] * 50), "dull"], tiny_tokenizer, max_length=10)
    assert model.calls == [(1, 10), (1, 3)]


def test_inputs_are_restricted_to_what_the_model_takes(sentences, tiny_tokenizer):
    assert accepted_inputs(NoTokenTypes()) == ("input_ids", "attention_mask")
    assert accepted_inputs(FakeClassifier()) == ("input_ids", "attention_mask", "token_type_ids")
    assert "token_type_ids" in tiny_tokenizer("good")  # so the model would be given it unless dropped
    assert predict_single(NoTokenTypes(), sentences[:3], tiny_tokenizer).tolist() == [0, 0, 0]
    assert e2e_latency(NoTokenTypes(), tiny_tokenizer, sentences[:3], warmup=1, warmup_seconds=0).samples == 3


def test_a_real_model_without_token_type_ids(tiny_distilbert_dir, sentences, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_distilbert_dir).eval()
    preds = predict_single(model, sentences[:5], tiny_tokenizer)
    with torch.no_grad():
        expected = [int(model(**tiny_tokenizer(s, return_tensors="pt", return_token_type_ids=False)).logits.argmax())
                    for s in sentences[:5]]
    assert preds.tolist() == expected


def test_a_tokenizer_without_token_type_ids(tiny_tokenizer, tiny_model, sentences):
    from transformers import BertTokenizer

    plain = BertTokenizer(vocab=tiny_tokenizer.vocab, model_input_names=["input_ids", "attention_mask"])
    assert "token_type_ids" not in plain("good")
    model = FakeClassifier()
    predict_single(model, sentences[:4], plain)
    assert model.kwargs == [{"attention_mask"}] * 4
    np.testing.assert_array_equal(predict_single(tiny_model, sentences, plain),
                                  predict_single(tiny_model, sentences, tiny_tokenizer))


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


def test_timing_a_wrapper_leaves_the_wrapped_model_deterministic(tiny_model, validation, tiny_tokenizer):
    """The CPU gate times a slowed wrapper of a variant, then the variant itself: the wrapper's timing must not
    leave the variant training (dropout on: slower, and predictions at random). Found as an fp32 row's ratio to
    the teacher rising 8-32% after the first of benchmarks.gate_noise's reruns."""
    from benchmarks.conftest import delayed

    tiny_model.config.hidden_dropout_prob = 0.5
    for layer in tiny_model.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.5
    examples = single_examples(validation, tiny_tokenizer, limit=4)
    with torch.inference_mode():
        before = [tiny_model(**e).logits for e in examples]
    latency(delayed(tiny_model, 0.0), examples, warmup=1, warmup_seconds=0)
    paired_latency(delayed(tiny_model, 0.0), tiny_model, examples, warmup=1, warmup_seconds=0, block=2, lead=1)
    assert not any(m.training for m in tiny_model.modules())
    with torch.inference_mode():
        for e, want in zip(examples, before):
            torch.testing.assert_close(tiny_model(**e).logits, want)


def test_latency_tiny_model(tiny_model, validation, tiny_tokenizer):
    lat = latency(tiny_model, single_examples(validation, tiny_tokenizer, limit=4), warmup=1, repeats=2)
    assert lat.samples == 8 and 0 < lat.median <= lat.p90


class _Clock:
    """A perf_counter that only the fake models below advance."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Costly(FakeClassifier):
    """A FakeClassifier whose calls take `cost(call number)` milliseconds of the fake clock; records its name."""

    def __init__(self, clock, log, name, cost):
        super().__init__()
        self.clock, self.log, self.name, self.cost = clock, log, name, cost

    def forward(self, **batch):
        self.clock.now += self.cost(len(self.calls)) / 1000.0
        self.log.append(self.name)
        return super().forward(**batch)


def test_paired_latency_alternates_blocks_each_led_by_untimed_calls(monkeypatch, validation, tiny_tokenizer):
    clock, log = _Clock(), []
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=clock))
    model, ref = _Costly(clock, log, "m", lambda i: 1.0), _Costly(clock, log, "r", lambda i: 4.0)
    examples = single_examples(validation, tiny_tokenizer, limit=10)
    p = paired_latency(model, ref, examples, warmup=2, warmup_seconds=0, block=4, lead=1)
    # warm-up (2 untimed + a pass over 2 sentences, each side), then blocks of 4, 4 and 2 sentences, each side
    # led by one untimed call
    assert "".join(log) == "rrrrmmmm" + "r" * 5 + "m" * 5 + "r" * 5 + "m" * 5 + "r" * 3 + "m" * 3
    assert p.model.samples == p.reference.samples == 10
    assert p.ratio == pytest.approx(0.25) and p.block_ratios == pytest.approx((0.25, 0.25, 0.25))
    assert p.model.median == pytest.approx(1.0) and p.reference.median == pytest.approx(4.0)


def test_paired_latency_without_warmup_goes_straight_to_the_blocks(monkeypatch, validation, tiny_tokenizer):
    clock, log = _Clock(), []
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=clock))
    model, ref = _Costly(clock, log, "m", lambda i: 1.0), _Costly(clock, log, "r", lambda i: 2.0)
    p = paired_latency(model, ref, single_examples(validation, tiny_tokenizer, limit=6), warmup=0, block=3, lead=1)
    assert "".join(log) == ("r" * 4 + "m" * 4) * 2  # a profile's warmup 0: no warm-up calls, each block still led
    assert p.ratio == pytest.approx(0.5)


def test_paired_latency_ratio_is_the_median_block_ratio(monkeypatch, validation, tiny_tokenizer):
    # one block of the model disturbed (say, by another process): the judged ratio stays the undisturbed one
    clock, log = _Clock(), []
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=clock))
    model = _Costly(clock, log, "m", lambda i: 9.0 if 7 <= i < 12 else 2.0)  # calls 7-11: its second block
    ref = _Costly(clock, log, "r", lambda i: 4.0)
    examples = single_examples(validation, tiny_tokenizer, limit=12)
    p = paired_latency(model, ref, examples, warmup=1, warmup_seconds=0, block=4, lead=1)
    assert p.block_ratios == pytest.approx((0.5, 2.25, 0.5))
    assert p.ratio == pytest.approx(0.5)


def test_gate_paired_latency_times_as_the_gate_does(monkeypatch, validation, tiny_tokenizer):
    from compression.measure import GATE_PASSES, GATE_THREADS, gate_paired_latency

    seen = set()

    class Recording(FakeClassifier):
        def forward(self, **batch):
            seen.add(torch.get_num_threads())
            return super().forward(**batch)

    examples = single_examples(validation, tiny_tokenizer, limit=5)
    p = gate_paired_latency(Recording(), FakeClassifier(), examples, warmup=1)
    assert seen == {GATE_THREADS}
    assert p.model.samples == p.reference.samples == 5 * GATE_PASSES
    assert len(p.block_ratios) == GATE_PASSES  # one block of 5 sentences per pass


def test_paired_latency_on_given_threads_reopens_onnx_models_and_restores_torch(monkeypatch, validation,
                                                                                 tiny_tokenizer):
    seen = {}

    class Reopenable(FakeClassifier):
        def with_threads(self, threads):
            seen["reopened"] = threads
            return self

    class Recording(FakeClassifier):
        def forward(self, **batch):
            seen.setdefault("torch threads", set()).add(torch.get_num_threads())
            return super().forward(**batch)

    before = torch.get_num_threads()
    examples = single_examples(validation, tiny_tokenizer, limit=4)
    p = paired_latency(Reopenable(), Recording(), examples, warmup=1, warmup_seconds=0, threads=1)
    assert seen == {"reopened": 1, "torch threads": {1}}
    assert torch.get_num_threads() == before and p.model.samples == 4
    with pytest.raises(ValueError, match="threads must be >= 1"):
        paired_latency(FakeClassifier(), FakeClassifier(), examples, threads=0)


def test_paired_latency_rejects_bad_arguments(validation, tiny_tokenizer):
    examples = single_examples(validation, tiny_tokenizer, limit=3)
    with pytest.raises(ValueError, match="3 examples but 2 reference"):
        paired_latency(FakeClassifier(), FakeClassifier(), examples, reference_examples=examples[:2])
    with pytest.raises(ValueError, match="block=0"):
        paired_latency(FakeClassifier(), FakeClassifier(), examples, block=0)
    with pytest.raises(ValueError, match="passes=0"):
        paired_latency(FakeClassifier(), FakeClassifier(), examples, passes=0)


def test_paired_latency_passes_repeat_the_blocks_and_pool_their_ratios(monkeypatch, validation, tiny_tokenizer):
    # the model is slow on its first pass only: over three passes the median block ratio is the usual one
    clock, log = _Clock(), []
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=clock))
    model = _Costly(clock, log, "m", lambda i: 6.0 if i < 14 else 2.0)  # warm-up (4 calls), first pass (2 blocks of 5)
    ref = _Costly(clock, log, "r", lambda i: 4.0)
    examples = single_examples(validation, tiny_tokenizer, limit=8)
    p = paired_latency(model, ref, examples, warmup=2, warmup_seconds=0, block=4, lead=1, passes=3)
    assert "".join(log) == "rrrrmmmm" + ("r" * 5 + "m" * 5) * 6
    assert p.block_ratios == pytest.approx((1.5, 1.5, 0.5, 0.5, 0.5, 0.5))
    assert p.ratio == pytest.approx(0.5)
    assert p.model.samples == p.reference.samples == 24


def test_latency_needs_examples():
    with pytest.raises(ValueError, match="at least one example"):
        latency(FakeClassifier(), [])


# --- e2e_latency: tokenize + forward -------------------------------------------------------------------------


class Clock:
    """A fake perf_counter that only the tokenizer and the model move forward."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


class CountingTokenizer:
    """Wraps a tokenizer: counts calls and advances the clock by `ms` each."""

    def __init__(self, tokenizer, clock: Clock, ms: float):
        self.tokenizer, self.clock, self.ms, self.calls = tokenizer, clock, ms, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.clock.now += self.ms / 1000.0
        return self.tokenizer(*args, **kwargs)


class SlowFake(FakeClassifier):
    def __init__(self, clock: Clock, ms: float):
        super().__init__()
        self.clock, self.ms = clock, ms

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        self.clock.now += self.ms / 1000.0
        return super().forward(input_ids, attention_mask, token_type_ids)


def test_e2e_latency_times_tokenizer_and_forward_once_per_sentence(monkeypatch, sentences, tiny_tokenizer):
    clock = Clock()
    monkeypatch.setattr(measure, "time", clock)
    tokenizer, model = CountingTokenizer(tiny_tokenizer, clock, ms=5.0), SlowFake(clock, ms=1.0)
    lat = e2e_latency(model, tokenizer, sentences[:7], warmup=3, warmup_seconds=0)
    assert lat.samples == 7
    assert lat.median == pytest.approx(6.0) and lat.p90 == pytest.approx(6.0)  # tokenizer 5 ms + forward 1 ms
    assert tokenizer.calls == 3 + 7 and len(model.calls) == 3 + 7  # warm-up calls tokenize too, untimed
    timed = model.calls[3:]
    assert timed == [(1, len(tiny_tokenizer(s)["input_ids"])) for s in sentences[:7]]  # each sentence, unpadded
    # the model-only figure on the same sentences leaves the tokenizer out
    examples = [dict(tiny_tokenizer(s, return_tensors="pt")) for s in sentences[:7]]
    assert latency(model, examples, warmup=0, warmup_seconds=0).median == pytest.approx(1.0)


def test_e2e_latency_warms_up_for_at_least_warmup_seconds(monkeypatch, sentences, tiny_tokenizer):
    clock = Clock()
    monkeypatch.setattr(measure, "time", clock)
    tokenizer = CountingTokenizer(tiny_tokenizer, clock, ms=5.0)
    e2e_latency(SlowFake(clock, ms=1.0), tokenizer, sentences[:2], warmup=2, warmup_seconds=0.032)
    assert tokenizer.calls == 6 + 2  # 6 ms a call: 2 calls are not 32 ms, 6 are
    tokenizer.calls = 0
    e2e_latency(SlowFake(clock, ms=1.0), tokenizer, sentences[:2], warmup=9, warmup_seconds=0.032)
    assert tokenizer.calls == 9 + 2  # and at least `warmup` calls


def test_e2e_latency_tiny_model(tiny_model, sentences, tiny_tokenizer):
    lat = e2e_latency(tiny_model, tiny_tokenizer, sentences[:4], warmup=1)
    assert lat.samples == 4 and 0 < lat.median <= lat.p90


def test_e2e_latency_needs_sentences(tiny_tokenizer):
    with pytest.raises(ValueError, match="at least one sentence"):
        e2e_latency(FakeClassifier(), tiny_tokenizer, [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_predict_single_and_e2e_latency_on_cuda(tiny_model, validation, sentences, tiny_tokenizer):
    split_decisions(tiny_model, sentences, tiny_tokenizer)
    model = tiny_model.cuda()
    single = predict_single(model, sentences, tiny_tokenizer)
    np.testing.assert_array_equal(single, predict(model, validation, tiny_tokenizer, batch_size=16))
    lat = e2e_latency(model, tiny_tokenizer, sentences[:4], warmup=1)
    assert lat.samples == 4 and 0 < lat.median <= lat.p90


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
    assert model_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")  # the parameters' device


def test_one_string_is_not_read_as_a_list_of_characters(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="a list of sentences, not one string"):
        predict_single(tiny_model, "a good movie", tiny_tokenizer)


@pytest.mark.parametrize(("predictions", "references"), [([], []), ([1, 0], [1])])
def test_accuracy_refuses_empty_or_unequal_lengths(predictions, references):
    with pytest.raises(ValueError, match="as many predictions as references"):
        accuracy(np.array(predictions), references)


def test_predictions_are_made_in_eval_mode_and_the_mode_is_kept(tiny_model, tiny_tokenizer, validation, sentences):
    """A model handed over in train mode (dropout on) is measured as the deterministic function it serves as."""
    tiny_model.config.hidden_dropout_prob = 0.5
    for module in tiny_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    tiny_model.eval()
    batched, single = predict(tiny_model, validation, tiny_tokenizer), predict_single(tiny_model, sentences, tiny_tokenizer)
    tiny_model.train()
    assert np.array_equal(predict(tiny_model, validation, tiny_tokenizer), batched)
    assert np.array_equal(predict_single(tiny_model, sentences, tiny_tokenizer), single)
    assert tiny_model.training
