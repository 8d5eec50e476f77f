"""Low-rank word embeddings: the SVD factors (Eckart-Young, as properties), the surgery for each family, parameter
accounting, save/load, int8 and bnb8 of a factored model, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from compression.artifacts import load_classifier, load_model, save_classifier, save_quantized
from compression.low_rank import (
    RANK_KEY,
    LowRankConfig,
    LowRankEmbedding,
    factorize_embeddings_,
    low_rank_factors,
    saves,
)
from compression.models import count_parameters
from compression.prune import prune_heads_
from compression.quantize import Bnb8Config, Int8Config, quantize
from conftest import FAMILY_FIXTURES, tiny_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SENTENCES = ["a good movie .", "not very funny , too slow", "the acting is brilliant !", "dull , weak script"]
RANK = 8


@pytest.fixture(params=list(FAMILY_FIXTURES))
def family(request) -> str:
    return request.param


@torch.no_grad()
def logits(model, tokenizer, sentences=SENTENCES) -> torch.Tensor:
    return model(**tokenizer(sentences, padding=True, return_tensors="pt")).logits


def factored(model, rank: int = RANK):
    out = copy.deepcopy(model)
    factorize_embeddings_(out, LowRankConfig(rank))
    return out


# --- the factors -----------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(v=st.integers(2, 40), h=st.integers(2, 24), seed=st.integers(0, 2**16), data=st.data())
def test_factors_are_the_best_rank_r_approximation(v, h, seed, data):
    rank = data.draw(st.integers(1, min(v, h) - 1))
    weight = torch.randn(v, h, generator=torch.Generator().manual_seed(seed))
    rows, projection = low_rank_factors(weight, rank)
    assert rows.shape == (v, rank) and projection.shape == (rank, h) and rows.dtype == weight.dtype
    s = torch.linalg.svdvals(weight.double())
    # Eckart-Young: the error of the best rank-r approximation is the norm of the dropped singular values
    error = torch.linalg.matrix_norm((weight - rows @ projection).double())
    assert torch.isclose(error, s[rank:].norm(), rtol=1e-4, atol=1e-5)
    # the singular values are split evenly: both factors have the same column / row norms
    assert torch.allclose(rows.norm(dim=0), projection.norm(dim=1), rtol=1e-4)


def test_factors_of_a_low_rank_table_are_exact():
    torch.manual_seed(0)
    weight = torch.randn(30, 3) @ torch.randn(3, 12)
    rows, projection = low_rank_factors(weight, 3)
    assert torch.allclose(rows @ projection, weight, atol=1e-5)


@pytest.mark.parametrize(("shape", "rank", "message"), [((5, 4), 4, "rank must be in 1..3"), ((5, 4), 0, "1..3"),
                                                         ((20,), 2, "a \\[V, H\\] table")])
def test_factors_refuse_bad_ranks_and_shapes(shape, rank, message):
    with pytest.raises(ValueError, match=message):
        low_rank_factors(torch.randn(*shape), rank)


@pytest.mark.parametrize("rank", [0, -3, 2.5, True, "8"])
def test_config_refuses_a_bad_rank(rank):
    with pytest.raises(ValueError, match="rank must be a whole number"):
        LowRankConfig(rank)


def test_saves_exactly_below_the_break_even_rank():
    # a 30 x 12 table holds 360 numbers; rank r factors hold 42 r: 8 -> 336 saves, 9 -> 378 does not
    assert saves(8, 30, 12) and not saves(9, 30, 12)
    assert not saves(6, 12, 12)  # 6 x (12 + 12) = 144 = 12 x 12: equal is no saving
    assert saves(128, 11_576, 384) and not saves(384, 11_576, 384)


@settings(max_examples=100, deadline=None)
@given(v=st.integers(1, 10**6), h=st.integers(1, 4096), rank=st.integers(2, 4096))
def test_a_rank_that_saves_means_every_lower_rank_saves_too(v, h, rank):
    assert not saves(rank, v, h) or saves(rank - 1, v, h)


# --- surgery ---------------------------------------------------------------------------------------------------


def test_factored_model_is_the_model_with_its_table_replaced_by_the_product(request, family):
    model, tokenizer = tiny_classifier(request, family)
    out = factored(model)
    table = model.get_input_embeddings().weight
    rows, projection = low_rank_factors(table, RANK)
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        by_hand.get_input_embeddings().weight.copy_(rows @ projection)
    assert torch.allclose(logits(out, tokenizer), logits(by_hand, tokenizer), atol=1e-5)
    assert not torch.allclose(logits(out, tokenizer), logits(model, tokenizer), atol=1e-3)  # rank 8 < hidden: lossy
    embedding = out.get_input_embeddings()
    assert isinstance(embedding, LowRankEmbedding) and getattr(out.config, RANK_KEY) == RANK
    assert torch.allclose(embedding.weight, rows @ projection, atol=1e-6)  # the table it stands for


def test_parameters_fall_by_the_table_minus_its_factors(request, family):
    model, _ = tiny_classifier(request, family)
    v, h = model.get_input_embeddings().weight.shape
    assert count_parameters(model) - count_parameters(factored(model)) == v * h - RANK * (v + h)


def test_factoring_twice_or_a_rank_that_saves_nothing_is_refused(request):
    model, _ = tiny_classifier(request, "bert")
    with pytest.raises(ValueError, match="already factored"):
        factorize_embeddings_(factored(model), LowRankConfig(RANK))
    v, h = model.get_input_embeddings().weight.shape
    with pytest.raises(ValueError, match=f"embedding rank {h} saves nothing on a {v} x {h} table"):
        factorize_embeddings_(copy.deepcopy(model), LowRankConfig(h))
    assert isinstance(model.get_input_embeddings(), nn.Embedding)  # a refused call leaves the model whole


def test_a_model_of_no_supported_family_is_refused():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    model = AlbertForSequenceClassification(AlbertConfig(vocab_size=40, hidden_size=16, num_attention_heads=2,
                                                         intermediate_size=20, embedding_size=8))
    with pytest.raises(ValueError, match="'albert'"):
        factorize_embeddings_(model, LowRankConfig(4))


def test_a_factored_model_trains(request):
    model, tokenizer = tiny_classifier(request, "bert")
    out = factored(model).train()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    out(**batch, labels=torch.tensor([1, 0, 1, 0])).loss.backward()
    embedding = out.get_input_embeddings()
    assert embedding.rows.weight.grad.abs().sum() > 0 and embedding.projection.weight.grad.abs().sum() > 0


# --- save and load, 8-bit --------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads_too", [False, True])
def test_factored_model_round_trips(request, family, heads_too, tmp_path):
    model, tokenizer = tiny_classifier(request, family)
    out = factored(model)
    if heads_too:
        keep = torch.ones(out.config.num_hidden_layers, out.config.num_attention_heads, dtype=torch.bool)
        keep[0, 1] = False
        prune_heads_(out, keep)
    save_classifier(out, tokenizer, tmp_path)
    loaded, _ = load_classifier(tmp_path)
    assert isinstance(loaded.get_input_embeddings(), LowRankEmbedding)
    assert count_parameters(loaded) == count_parameters(out)
    assert torch.equal(logits(loaded, tokenizer), logits(out, tokenizer))


@pytest.mark.parametrize("backend", ["int8", "bnb8"])
def test_quantized_factored_model_is_close_to_its_fp32_and_round_trips(request, family, backend, tmp_path):
    model, tokenizer = tiny_classifier(request, family)
    out = factored(model)
    fp32 = logits(out, tokenizer)
    q = quantize(copy.deepcopy(out), Int8Config(threads=1) if backend == "int8" else Bnb8Config())
    q_logits = logits(q, tokenizer)
    assert (q_logits - fp32).abs().max() < 0.1 * fp32.abs().max() + 1e-3
    assert (fp32 - fp32.mean(0)).abs().max() > 0.2 * fp32.abs().max()  # so agreeing is not agreeing on a constant
    save_quantized(q, tokenizer, tmp_path)
    loaded, _ = load_model(tmp_path)
    assert torch.allclose(logits(loaded, tokenizer), q_logits, atol=1e-6)
