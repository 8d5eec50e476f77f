"""FFN-neuron pruning: mask choice, structural removal equals zeroed neurons (every family, with and without head
pruning), parameter accounting, importance, save/load, 8-bit."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_families import (
    FAMILIES,
    SUPPORTED,
    check_quantized_round_trip,
    classifier,
    family_parts,
    heads_parameters,
    logits,
    some_keep_mask,
)

from compression.artifacts import load_classifier, save_classifier
from compression.models import count_parameters
from compression.prune import head_gates, kept_heads, prune_heads_
from compression.prune_ffn import (
    FfnPruneConfig,
    ffn_gates,
    ffn_importance,
    ffn_keep_mask,
    intermediate_size,
    kept_neurons,
    neuron_mask_from_kept,
    prune_ffn_,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS, HIDDEN, NEURONS = 4, 32, 37  # the tiny BERT of conftest.py


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def some_neuron_mask(layers: int, neurons: int) -> torch.Tensor:
    """bool [layers, neurons]: every third neuron gone from the first layer, nine from the last, one from the rest."""
    keep = torch.ones(layers, neurons, dtype=torch.bool)
    keep[0, ::3] = False
    keep[-1, 1:10] = False
    keep[1:-1, 5] = False
    return keep


def neuron_parameters(config) -> int:
    """Parameters of one FFN neuron: its up-projection row and bias, and its down-projection column."""
    return 2 * config.hidden_size + 1


@torch.no_grad()
def zeroed_logits(model, batch, neurons: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
    """The unpruned model's logits [B, C] with the removed neurons' activations (and heads' context) zeroed."""
    with ffn_gates(model, lambda layer, b, n: neurons[layer].float().expand(b, n)):
        if heads is None:
            return model(**batch).logits
        with head_gates(model, lambda layer, b, h: heads[layer].float().expand(b, h)):
            return model(**batch).logits


def close(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


# --- surgery, every family -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pruned_equals_zeroed_with_exact_parameter_accounting(request, family, pooling):
    config, _, batch = family_parts(request, family)
    model = classifier(config, pooling)
    keep = some_neuron_mask(config.num_hidden_layers, intermediate_size(model))
    reference = zeroed_logits(model, batch, keep)
    assert (reference - logits(model, batch)).abs().max() > 1e-4  # removing these neurons matters
    pruned = prune_ffn_(copy.deepcopy(model), keep)
    close(logits(pruned, batch), reference)
    assert count_parameters(model) - count_parameters(pruned) == int((~keep).sum()) * neuron_parameters(config)
    assert kept_neurons(pruned) == [row.nonzero().flatten().tolist() for row in keep]
    assert intermediate_size(pruned) == intermediate_size(model)  # the config keeps the original width


def test_pruned_after_heads_equals_both_zeroed_either_order(request, family):
    config, _, batch = family_parts(request, family)
    model = classifier(config, "mean")
    layers = config.num_hidden_layers
    heads, neurons = some_keep_mask(layers, config.num_attention_heads), some_neuron_mask(layers,
                                                                                         intermediate_size(model))
    reference = zeroed_logits(model, batch, neurons, heads)
    heads_first = prune_ffn_(prune_heads_(copy.deepcopy(model), heads), neurons)
    ffn_first = prune_heads_(prune_ffn_(copy.deepcopy(model), neurons), heads)
    close(logits(heads_first, batch), reference)
    close(logits(ffn_first, batch), reference)
    removed = int((~heads).sum()) * heads_parameters(config) + int((~neurons).sum()) * neuron_parameters(config)
    assert count_parameters(model) - count_parameters(heads_first) == removed == (
        count_parameters(model) - count_parameters(ffn_first))
    assert kept_heads(heads_first) == kept_heads(ffn_first) and kept_neurons(heads_first) == kept_neurons(ffn_first)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_ffn_and_head_pruned_model_round_trips_through_save_and_load(request, family, pooling, tmp_path):
    config, tokenizer, batch = family_parts(request, family)
    model = classifier(config, pooling)
    layers = config.num_hidden_layers
    prune_heads_(model, some_keep_mask(layers, config.num_attention_heads))
    prune_ffn_(model, some_neuron_mask(layers, intermediate_size(model)))
    save_classifier(model, tokenizer, tmp_path)
    loaded, _ = load_classifier(tmp_path)
    assert type(loaded) is type(model)
    assert kept_heads(loaded) == kept_heads(model) and kept_neurons(loaded) == kept_neurons(model)
    assert count_parameters(loaded) == count_parameters(model)
    assert torch.equal(logits(loaded, batch), logits(model, batch))


@pytest.mark.parametrize("backend", ["int8", "bnb8"])
def test_quantized_ffn_and_head_pruned_model_round_trips(request, family, backend, tmp_path):
    config, tokenizer, batch = family_parts(request, family)
    model = classifier(config, "mean")
    layers = config.num_hidden_layers
    prune_heads_(model, some_keep_mask(layers, config.num_attention_heads))
    prune_ffn_(model, some_neuron_mask(layers, intermediate_size(model)))
    loaded = check_quantized_round_trip(model, tokenizer, batch, backend, tmp_path)  # close to fp32, then equal
    assert loaded.config.kept_neurons == kept_neurons(model)


# --- surgery, any mask (the tiny BERT) ---------------------------------------------------------------------------


def neuron_masks(layers: int = LAYERS, neurons: int = NEURONS):
    """Any bool [layers, neurons] mask keeping at least one neuron per layer."""
    row = st.lists(st.booleans(), min_size=neurons, max_size=neurons).filter(any)
    return st.lists(row, min_size=layers, max_size=layers).map(lambda rows: torch.tensor(rows))


@pytest.fixture(scope="module")
def sharp_bert(tiny_config):
    return classifier(tiny_config, "mean")


@settings(max_examples=25, deadline=None)
@given(keep=neuron_masks())
def test_any_mask_pruned_equals_zeroed(sharp_bert, tiny_batch, keep):
    pruned = prune_ffn_(copy.deepcopy(sharp_bert), keep)
    close(logits(pruned, tiny_batch), zeroed_logits(sharp_bert, tiny_batch, keep))
    assert count_parameters(sharp_bert) - count_parameters(pruned) == int((~keep).sum()) * (2 * HIDDEN + 1)


@settings(max_examples=25, deadline=None)
@given(first=neuron_masks(), other=neuron_masks())
def test_pruning_twice_composes_on_original_indices(sharp_bert, tiny_batch, first, other):
    second = first & other  # the second cut keeps only neurons the first kept
    for layer in range(LAYERS):
        if not second[layer].any():
            second[layer, first[layer].nonzero()[0]] = True
    twice = prune_ffn_(prune_ffn_(copy.deepcopy(sharp_bert), first), second)
    once = prune_ffn_(copy.deepcopy(sharp_bert), second)
    assert kept_neurons(twice) == kept_neurons(once) == [row.nonzero().flatten().tolist() for row in second]
    close(logits(twice, tiny_batch), logits(once, tiny_batch))


def test_pruning_really_shrinks_the_modules(tiny_model):
    keep = torch.ones(LAYERS, NEURONS, dtype=torch.bool)
    keep[2, :30] = False
    prune_ffn_(tiny_model, keep)
    layer = tiny_model.bert.encoder.layer[2]
    assert layer.intermediate.dense.weight.shape == (7, HIDDEN) and layer.intermediate.dense.bias.shape == (7,)
    assert layer.output.dense.weight.shape == (HIDDEN, 7) and layer.output.dense.bias.shape == (HIDDEN,)
    assert tiny_model.bert.encoder.layer[1].intermediate.dense.weight.shape == (NEURONS, HIDDEN)


def test_keeping_a_removed_neuron_is_refused(tiny_model):
    keep = torch.ones(LAYERS, NEURONS, dtype=torch.bool)
    keep[3, 11] = False
    prune_ffn_(tiny_model, keep)
    with pytest.raises(ValueError, match="keeps neuron 11 of layer 3, which was already removed"):
        prune_ffn_(tiny_model, torch.ones(LAYERS, NEURONS, dtype=torch.bool))


@pytest.mark.parametrize(
    "keep, message",
    [
        (torch.ones(LAYERS, NEURONS + 1, dtype=torch.bool), r"shape \(4, 38\), expected \(4, 37\)"),
        (torch.ones(LAYERS - 1, NEURONS, dtype=torch.bool), r"shape \(3, 37\), expected \(4, 37\)"),
        (torch.ones(LAYERS, NEURONS), "must be a bool tensor, got torch.float32"),
        (torch.ones(LAYERS, NEURONS, dtype=torch.bool).index_fill(0, torch.tensor([2]), False),
         "removes every neuron of layer 2; a layer must keep at least one"),
    ],
)
def test_bad_masks_are_refused_with_the_value_named(tiny_model, keep, message):
    with pytest.raises(ValueError, match=message):
        prune_ffn_(tiny_model, keep)


def test_neuron_index_out_of_range_is_named():
    with pytest.raises(ValueError, match="neuron index 40 in layer 1 is out of range 0..36"):
        neuron_mask_from_kept([[0], [40]], NEURONS)


@pytest.mark.parametrize("stage", [lambda m: prune_ffn_(m, torch.ones(1, 1, dtype=torch.bool)),
                                   lambda m: ffn_importance(m, [])], ids=["prune", "importance"])
def test_model_of_no_supported_family_is_refused(stage):
    with pytest.raises(ValueError, match=f"FFN pruning supports {SUPPORTED} models, this one is Sequential"):
        stage(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# --- importance --------------------------------------------------------------------------------------------------


def labelled(batch):
    return {**batch, "labels": torch.tensor([1, 0, 1, 0])}


def test_importance_is_per_layer_normalised_and_finds_a_dead_neuron(tiny_model, tiny_batch):
    # A neuron whose down-projection column is zero contributes nothing, so its gate gradient is zero.
    with torch.no_grad():
        tiny_model.bert.encoder.layer[1].output.dense.weight[:, 6] = 0
    scores = ffn_importance(tiny_model, [labelled(tiny_batch)] * 2)
    assert scores.shape == (LAYERS, NEURONS) and (scores >= 0).all()
    assert torch.allclose(scores.norm(dim=1), torch.ones(LAYERS), atol=1e-5)
    assert scores[1, 6] == 0
    assert ffn_keep_mask(scores, 1)[1, 6].item() is False


def test_importance_is_the_taylor_term_a_times_its_gradient(tiny_model, tiny_batch):
    """|sum_t a_t dL/da_t| per example from the gates, against autograd on the activations themselves, and a
    finite difference of the loss in one neuron's gate."""
    tiny_model.double()
    batch = {k: v[:1] for k, v in tiny_batch.items()} | {"labels": torch.tensor([1])}
    layer, neuron, eps = 2, 17, 1e-6
    saved = []

    def keep_activation(module, args):
        args[0].retain_grad()
        saved.append(args[0])

    hook = tiny_model.bert.encoder.layer[layer].output.dense.register_forward_pre_hook(keep_activation)
    tiny_model(**batch).loss.backward()
    hook.remove()
    (a,) = saved  # [1, T, neurons]
    taylor = (a * a.grad)[0, :, neuron].sum().abs().item()

    def loss_at(xi):
        def gate(layer_index, b, n):
            g = torch.ones(b, n, dtype=torch.float64)
            if layer_index == layer:
                g[:, neuron] = xi
            return g

        with ffn_gates(tiny_model, gate), torch.no_grad():
            return tiny_model(**batch).loss.item()

    numeric = abs(loss_at(1 + eps) - loss_at(1 - eps)) / (2 * eps)
    assert taylor == pytest.approx(numeric, rel=1e-4)
    with ffn_gates(tiny_model, lambda i, b, n: torch.ones(b, n, dtype=torch.float64, requires_grad=True)) as gates:
        grads = torch.autograd.grad(tiny_model(**batch).loss, gates)
    assert grads[layer].abs()[0, neuron].item() == pytest.approx(taylor, rel=1e-6)


def test_importance_of_a_head_pruned_model_and_refusal_of_an_ffn_pruned_one(tiny_model, tiny_model_session,
                                                                              tiny_batch):
    keep = torch.ones(LAYERS, 4, dtype=torch.bool)
    keep[0, 1] = False
    prune_heads_(tiny_model, keep)
    assert ffn_importance(tiny_model, [labelled(tiny_batch)]).shape == (LAYERS, NEURONS)
    prune_ffn_(tiny_model, some_neuron_mask(LAYERS, NEURONS))
    with pytest.raises(ValueError, match="already has some removed"):
        ffn_importance(tiny_model, [labelled(tiny_batch)])
    with pytest.raises(ValueError, match="no batches"):
        ffn_importance(copy.deepcopy(tiny_model_session), [])


def test_importance_leaves_the_model_as_it_was(tiny_model, tiny_batch):
    tiny_model.train()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    ffn_importance(tiny_model, [labelled(tiny_batch)])
    assert tiny_model.training
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in tiny_model.modules())  # the gates are gone


# --- choosing neurons from scores ----------------------------------------------------------------------------------


@st.composite
def scores_and_counts(draw):
    layers = draw(st.integers(1, 5))
    size = draw(st.integers(1, 12))
    min_keep = draw(st.integers(1, size))
    # few distinct values, so that ties are common
    values = draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0]) | st.floats(-1e3, 1e3, allow_nan=False),
                           min_size=layers * size, max_size=layers * size))
    most = layers * (size - min_keep)
    remove = draw(st.integers(0, most))
    more = draw(st.integers(remove, most))
    return torch.tensor(values).view(layers, size), remove, more, min_keep


@settings(max_examples=300, deadline=None)
@given(case=scores_and_counts())
def test_keep_mask_properties(case):
    scores, remove, more, min_keep = case
    keep = ffn_keep_mask(scores, remove, min_keep)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    assert int((~keep).sum()) == remove  # exactly the number asked
    assert (keep.sum(dim=1) >= min_keep).all()  # no layer below its floor, so none emptied
    # No kept neuron scores below a removed one, except the min_keep that each layer is guaranteed (its best).
    protected = torch.zeros_like(keep)
    protected.scatter_(1, scores.sort(dim=1, descending=True, stable=True).indices[:, :min_keep], True)
    if remove and (keep & ~protected).any():
        assert scores[keep & ~protected].min() >= scores[~keep].max()
    # nested: removing more never brings a neuron back
    assert not (ffn_keep_mask(scores, more, min_keep) & ~keep).any()
    assert torch.equal(ffn_keep_mask(scores, remove, min_keep), keep)  # pure: same input, same mask


def test_keep_mask_ranks_globally_and_keeps_each_layers_best():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.4], [0.2, 0.3, 0.05, 0.01]])
    assert ffn_keep_mask(scores, 4).tolist() == [[True, False, True, True], [False, True, False, False]]
    assert ffn_keep_mask(scores, 4, min_keep=2).tolist() == [[True, False, True, False], [True, True, False, False]]
    assert ffn_keep_mask(scores, 0.5).tolist() == ffn_keep_mask(scores, 4).tolist()  # a fraction of all 8


def test_keep_mask_refuses_what_would_empty_a_layer_or_bad_scores():
    with pytest.raises(ValueError, match="cannot remove 7 of 8 neurons: each of the 2 layers must keep one"):
        ffn_keep_mask(torch.rand(2, 4), 7)
    with pytest.raises(ValueError, match="cannot remove 5 of 8 neurons: each of the 2 layers must keep 2"):
        ffn_keep_mask(torch.rand(2, 4), 5, min_keep=2)
    with pytest.raises(ValueError, match="NaN"):
        ffn_keep_mask(torch.tensor([[float("nan"), 1.0]]), 1)
    with pytest.raises(ValueError, match="shape"):
        ffn_keep_mask(torch.ones(4), 1)
    with pytest.raises(ValueError, match="min_keep must be >= 1"):
        ffn_keep_mask(torch.ones(2, 2), 1, min_keep=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"remove": 0}, "remove must be a fraction"), ({"remove": 1.0}, "remove must be a fraction"),
    ({"remove": 3}, "remove must be a fraction"), ({"importance_batches": 0}, "importance_batches"),
    ({"batch_size": 0}, "batch_size"), ({"min_keep": 0}, "min_keep"),
])
def test_config_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FfnPruneConfig(**kwargs)
