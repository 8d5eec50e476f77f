"""compression.graphs: padded-length buckets, right-padding that leaves the logits alone, the eager fallback.

The capture itself needs CUDA (benchmarks/test_gpu.py); everything it rests on is checked here on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.graphs import GraphConfig, GraphedClassifier, bucket_length, capturable, pad_inputs
from compression.models import load_base

pytestmark = pytest.mark.usefixtures("one_torch_thread")

lengths_st = st.lists(st.integers(1, 256), min_size=1, max_size=6, unique=True).map(lambda v: tuple(sorted(v)))


def test_bucket_length_examples():
    assert bucket_length(1, (16, 32)) == 16
    assert bucket_length(16, (16, 32)) == 16
    assert bucket_length(17, (16, 32)) == 32
    assert bucket_length(33, (16, 32)) is None


@given(n=st.integers(1, 300), lengths=lengths_st)
@settings(max_examples=200, deadline=None)
def test_bucket_is_the_smallest_length_that_holds_the_tokens(n, lengths):
    got = bucket_length(n, lengths)
    fitting = [length for length in lengths if length >= n]
    if not fitting:
        assert got is None
    else:
        assert got == min(fitting) and got >= n


@pytest.mark.parametrize("bad", [{"lengths": ()}, {"lengths": (32, 16)}, {"lengths": (16, 16)},
                                 {"lengths": (0, 16)}, {"batch_sizes": ()}, {"batch_sizes": (2, 1)},
                                 {"warmup": 0}])
def test_config_rejects_what_cannot_be_captured(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GraphConfig(**bad)


def test_pad_inputs_right_pads_each_input_with_its_own_value():
    inputs = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
              "token_type_ids": torch.zeros(1, 3, dtype=torch.long)}
    out = pad_inputs(inputs, 5, pad_token_id=1)
    assert out["input_ids"].tolist() == [[5, 6, 7, 1, 1]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0]]
    assert out["token_type_ids"].tolist() == [[0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="input_ids has 3 tokens"):
        pad_inputs(inputs, 2, pad_token_id=0)


@given(tokens=st.integers(1, 20), extra=st.integers(0, 20))
@settings(max_examples=30, deadline=None)
def test_right_padding_leaves_the_logits_alone_bert(tiny_mean_model_session, tiny_model_session, tokens, extra):
    torch.manual_seed(tokens)
    inputs = {"input_ids": torch.randint(5, 30, (1, tokens)), "attention_mask": torch.ones(1, tokens, dtype=torch.long)}
    padded = pad_inputs(inputs, tokens + extra, pad_token_id=0)
    for model in (tiny_mean_model_session, tiny_model_session):  # mean pool and [CLS]
        with torch.inference_mode():
            torch.testing.assert_close(model(**padded).logits, model(**inputs).logits, atol=1e-5, rtol=1e-4)


def test_right_padding_leaves_the_logits_alone_mpnet(tiny_mpnet_dir):
    # MPNet numbers positions from its pad id and adds a relative-position bias per pair of tokens
    model, tokenizer = load_base(str(tiny_mpnet_dir), pooling="mean")
    model.eval()
    inputs = dict(tokenizer(["a good movie ."], return_tensors="pt"))
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    padded = pad_inputs(inputs, inputs["input_ids"].shape[1] + 9, tokenizer.pad_token_id)
    with torch.inference_mode():
        torch.testing.assert_close(model(**padded).logits, model(**inputs).logits, atol=1e-5, rtol=1e-4)


def test_on_the_cpu_the_wrapper_is_the_model(tiny_mean_model_session, tiny_batch):
    graphed = GraphedClassifier(copy.deepcopy(tiny_mean_model_session), GraphConfig(lengths=(8, 16)))
    with torch.inference_mode():
        want = tiny_mean_model_session(**tiny_batch).logits
        got = graphed(**tiny_batch).logits
    torch.testing.assert_close(got, want)
    assert graphed.graphs == {}  # nothing captured without CUDA
    assert graphed.names == ("input_ids", "attention_mask", "token_type_ids")


def test_a_missing_mask_is_made_so_padding_stays_invisible(tiny_mean_model_session):
    graphed = GraphedClassifier(tiny_mean_model_session)
    ids = torch.tensor([[2, 7, 8, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(graphed(input_ids=ids).logits, tiny_mean_model_session(input_ids=ids).logits)


def test_bitsandbytes_models_are_not_captured(tiny_model):
    bnb = pytest.importorskip("bitsandbytes")
    assert capturable(tiny_model)
    tiny_model.classifier = bnb.nn.Linear8bitLt(32, 2, has_fp16_weights=False)
    assert not capturable(tiny_model)
    assert not GraphedClassifier(tiny_model).graphable
