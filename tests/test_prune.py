"""Head pruning: mask choice, structural removal equivalence, parameter accounting, save/load."""

from __future__ import annotations

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.artifacts import load_classifier, save_classifier
from compression.data import batches, tokenize
from compression.models import count_parameters
from compression.prune import (
    PruneConfig,
    head_gates,
    head_importance,
    heads_to_remove,
    keep_mask_from_kept,
    keep_mask_from_scores,
    kept_heads,
    normalize_per_layer,
    prune_heads_,
)
from conftest import make_sentences

LAYERS, HEADS, HIDDEN = 4, 4, 32
HEAD_SIZE = HIDDEN // HEADS


def keep_masks():
    """Any bool [LAYERS, HEADS] mask with at least one head kept per layer."""
    row = st.lists(st.booleans(), min_size=HEADS, max_size=HEADS).filter(any)
    return st.lists(row, min_size=LAYERS, max_size=LAYERS).map(lambda rows: torch.tensor(rows))


@pytest.fixture(scope="module")
def sharp_model(tiny_model_session):
    """The tiny model with its encoder's matrices x5 (std 0.1 instead of 0.02).

    At init attention is nearly uniform, so a head's query and key rows hardly move the logits: cutting the wrong
    ones changed them by 1e-6, under any absolute tolerance fit for logits of 0.01. Here it changes them by a few
    percent, while pruning's own rounding stays under 1e-6 of their size.
    """
    import copy

    model = copy.deepcopy(tiny_model_session)
    with torch.no_grad():
        for name, p in model.bert.encoder.named_parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return model


def same_logits(actual, expected) -> bool:
    """Equal up to float rounding: 1e-4 of the logits' scale (a wrong head's rows move them by 1e-2 of it)."""
    return bool((actual - expected).abs().max() <= 1e-4 * expected.abs().max())


def gated_logits(model, batch, keep):
    """The unpruned model's logits with the removed heads' context zeroed."""
    with head_gates(model, lambda layer, b, heads: keep[layer].float().expand(b, heads)):
        return model(**batch).logits


@settings(max_examples=25, deadline=None)
@given(keep=keep_masks())
def test_pruned_logits_equal_zeroed_heads(sharp_model, tiny_batch, keep):
    import copy

    reference = gated_logits(sharp_model, tiny_batch, keep)
    pruned = prune_heads_(copy.deepcopy(sharp_model), keep)
    assert same_logits(pruned(**tiny_batch).logits, reference)


@settings(max_examples=25, deadline=None)
@given(keep=keep_masks())
def test_parameter_count_falls_by_removed_heads_exactly(tiny_model_session, keep):
    import copy

    removed = int((~keep).sum())
    # per head: Q, K, V weights (head_size x hidden) and biases (head_size), plus output.dense columns
    per_head = 3 * (HEAD_SIZE * HIDDEN + HEAD_SIZE) + HIDDEN * HEAD_SIZE
    pruned = prune_heads_(copy.deepcopy(tiny_model_session), keep)
    assert count_parameters(tiny_model_session) - count_parameters(pruned) == removed * per_head
    assert kept_heads(pruned) == [row.nonzero().flatten().tolist() for row in keep]


def test_pruning_really_shrinks_the_modules(tiny_model):
    keep = torch.ones(LAYERS, HEADS, dtype=torch.bool)
    keep[0, [0, 2]] = False
    prune_heads_(tiny_model, keep)
    attention = tiny_model.bert.encoder.layer[0].attention
    assert attention.self.query.weight.shape == (2 * HEAD_SIZE, HIDDEN)
    assert attention.output.dense.weight.shape == (HIDDEN, 2 * HEAD_SIZE)
    assert attention.self.num_attention_heads == 2
    assert tiny_model.bert.encoder.layer[1].attention.self.query.weight.shape == (HIDDEN, HIDDEN)


def test_pruning_composes_on_original_indices(sharp_model, tiny_batch):
    import copy

    first = torch.ones(LAYERS, HEADS, dtype=torch.bool)
    first[1, 0] = False
    second = first.clone()
    second[1, 3] = False
    second[2, 1] = False
    twice = prune_heads_(prune_heads_(copy.deepcopy(sharp_model), first), second)
    once = prune_heads_(copy.deepcopy(sharp_model), second)
    assert kept_heads(twice) == kept_heads(once) == [[0, 1, 2, 3], [1, 2], [0, 2, 3], [0, 1, 2, 3]]
    assert same_logits(twice(**tiny_batch).logits, once(**tiny_batch).logits)


def test_keeping_a_removed_head_is_refused(tiny_model):
    keep = torch.ones(LAYERS, HEADS, dtype=torch.bool)
    keep[0, 1] = False
    prune_heads_(tiny_model, keep)
    with pytest.raises(ValueError, match="head 1 of layer 0.*already removed"):
        prune_heads_(tiny_model, torch.ones(LAYERS, HEADS, dtype=torch.bool))


@pytest.mark.parametrize(
    "keep, message",
    [
        (torch.ones(LAYERS, HEADS + 1, dtype=torch.bool), r"shape \(4, 5\), expected \(4, 4\)"),
        (torch.ones(LAYERS - 1, HEADS, dtype=torch.bool), r"shape \(3, 4\), expected \(4, 4\)"),
        (torch.ones(LAYERS, HEADS), "must be a bool tensor, got torch.float32"),
        (torch.tensor([[True] * HEADS, [False] * HEADS, [True] * HEADS, [True] * HEADS]), "every head of layer 1"),
    ],
)
def test_bad_masks_are_refused_with_the_value_named(tiny_model, keep, message):
    with pytest.raises(ValueError, match=message):
        prune_heads_(tiny_model, keep)


def test_head_index_out_of_range_is_named():
    with pytest.raises(ValueError, match="head index 7 in layer 1 is out of range 0..3"):
        keep_mask_from_kept([[0], [7]], 4)


def test_model_of_no_supported_family_is_refused():
    with pytest.raises(ValueError, match="head pruning supports bert, roberta, mpnet, distilbert models, this one is "
                                         "Sequential"):
        prune_heads_(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.ones(1, 1, dtype=torch.bool))


def test_pruned_model_round_trips_through_save_and_load(any_tiny_model, tiny_tokenizer, tiny_batch, tmp_path):
    keep = torch.ones(LAYERS, HEADS, dtype=torch.bool)
    keep[0, 0] = keep[2, 1] = keep[2, 2] = keep[3, 3] = False
    prune_heads_(any_tiny_model, keep)
    save_classifier(any_tiny_model, tiny_tokenizer, tmp_path)
    loaded, _ = load_classifier(tmp_path)
    assert kept_heads(loaded) == kept_heads(any_tiny_model)
    assert count_parameters(loaded) == count_parameters(any_tiny_model)
    assert torch.equal(loaded(**tiny_batch).logits, any_tiny_model(**tiny_batch).logits)


# --- choosing heads from scores ------------------------------------------------------------------------------


@st.composite
def scores_and_count(draw):
    layers = draw(st.integers(1, 6))
    heads = draw(st.integers(1, 8))
    values = draw(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=layers * heads,
                           max_size=layers * heads))
    remove = draw(st.integers(0, layers * (heads - 1)))
    return torch.tensor(values).view(layers, heads), remove


@settings(max_examples=200, deadline=None)
@given(case=scores_and_count())
def test_mask_from_scores_properties(case):
    scores, remove = case
    keep = keep_mask_from_scores(scores, remove)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    assert int((~keep).sum()) == remove  # exactly the number asked
    assert keep.any(dim=1).all()  # no layer emptied
    # No kept head scores below a removed one, except the one head each layer is guaranteed (its best).
    best = torch.zeros_like(keep)
    best[torch.arange(scores.shape[0]), scores.argmax(dim=1)] = True
    kept_unprotected = scores[keep & ~best]
    if kept_unprotected.numel() and remove:
        assert kept_unprotected.min() >= scores[~keep].max()


def test_mask_from_scores_example():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.05]])
    keep = keep_mask_from_scores(scores, 3)
    assert keep.tolist() == [[True, False, True], [False, True, False]]


def test_a_layer_of_low_scores_keeps_its_best_head():
    scores = torch.tensor([[0.01, 0.02], [0.9, 0.8]])
    assert keep_mask_from_scores(scores, 2).tolist() == [[False, True], [True, False]]


def test_fraction_or_count():
    assert heads_to_remove(0.25, 3, 12) == 9
    assert heads_to_remove(5, 3, 12) == 5
    with pytest.raises(ValueError, match="cannot remove 34 of 36 heads"):
        heads_to_remove(34, 3, 12)


def test_scores_must_be_finite_and_2d():
    with pytest.raises(ValueError, match="NaN"):
        keep_mask_from_scores(torch.tensor([[float("nan"), 1.0]]), 1)
    with pytest.raises(ValueError, match="shape"):
        keep_mask_from_scores(torch.ones(4), 1)


@pytest.mark.parametrize("remove", [0, -0.5, 1.5, 2.7])
def test_prune_config_rejects_bad_remove(remove):
    with pytest.raises(ValueError, match=f"remove must be .* got {remove}"):
        PruneConfig(remove=remove)


def test_normalize_per_layer_gives_unit_rows():
    out = normalize_per_layer(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


# --- importance ----------------------------------------------------------------------------------------------


def test_head_importance_is_per_layer_normalised_and_finds_a_dead_head(tiny_model, tiny_batch):
    # A head whose value projection is zero contributes nothing, so its gate gradient is zero.
    value = tiny_model.bert.encoder.layer[2].attention.self.value
    with torch.no_grad():
        value.weight[HEAD_SIZE : 2 * HEAD_SIZE] = 0
        value.bias[HEAD_SIZE : 2 * HEAD_SIZE] = 0
    batch = {**tiny_batch, "labels": torch.tensor([1, 0, 1, 0])}
    scores = head_importance(tiny_model, [batch, batch])
    assert scores.shape == (LAYERS, HEADS)
    assert (scores >= 0).all()
    assert torch.allclose(scores.norm(dim=1), torch.ones(LAYERS), atol=1e-5)
    assert scores[2, 1] == 0
    assert keep_mask_from_scores(scores, 1)[2, 1].item() is False


def test_head_importance_takes_data_batches_as_they_come(tiny_model, tiny_tokenizer):
    """`data.batches(..., with_labels=True)` carries each row's `index` beside the model inputs: it is dropped."""
    rows = make_sentences(12, seed=3)
    ds = tokenize(datasets.Dataset.from_dict({"sentence": [s for s, _ in rows], "label": [y for _, y in rows]}),
                  tiny_tokenizer, max_length=32)
    made = batches(ds, tiny_tokenizer, 4, with_labels=True)
    assert all("index" in b for b in made)
    seen = []  # transformers 5's forward swallows unknown keywords (passing them on into attention), so look
    tiny_model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    scores = head_importance(tiny_model, made)
    assert seen == [{"input_ids", "token_type_ids", "attention_mask", "labels"}] * len(made)
    stripped = [{k: v for k, v in b.items() if k != "index"} for b in made]
    assert torch.equal(scores, head_importance(tiny_model, stripped))


def split_batch(batch: dict, sizes: list[int]) -> list[dict]:
    """`batch` with labels, cut into consecutive batches of `sizes` rows."""
    batch = batch | {"labels": torch.tensor([1, 0, 1, 0])[: len(batch["input_ids"])]}
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [{k: v[a:a + n] for k, v in batch.items()} for a, n in zip(starts, sizes)]


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1], [3, 1], [2, 2]])
def test_importance_does_not_depend_on_how_the_examples_are_batched(tiny_model, tiny_batch, sizes):
    """Each example counts once, by its own loss's gradient: a short last batch (data.batches ends with the longest
    sentences) does not weigh its examples more. Heads and FFN neurons share the scoring."""
    from compression.prune_ffn import ffn_importance

    tiny_model.double()
    for score in (head_importance, ffn_importance):
        whole = score(tiny_model, split_batch(tiny_batch, [4]))
        torch.testing.assert_close(score(tiny_model, split_batch(tiny_batch, sizes)), whole, rtol=1e-5, atol=1e-7)


def test_head_importance_matches_finite_difference_of_a_gate(tiny_model, tiny_batch):
    """|dL/dξ| from the hooks agrees with a numerical derivative of the loss in one head's gate."""
    batch = {k: v[:1] for k, v in tiny_batch.items()} | {"labels": torch.tensor([1])}
    tiny_model.double()
    layer, head, eps = 1, 2, 1e-6

    def loss_at(xi):
        def gate(layer_index, b, heads):
            g = torch.ones(b, heads, dtype=torch.float64)
            if layer_index == layer:
                g[:, head] = xi
            return g

        with head_gates(tiny_model, gate), torch.no_grad():
            return tiny_model(**batch).loss.item()

    numeric = abs(loss_at(1 + eps) - loss_at(1 - eps)) / (2 * eps)
    raw = torch.zeros(LAYERS, HEADS, dtype=torch.float64)
    with head_gates(tiny_model, lambda i, b, h: torch.ones(b, h, dtype=torch.float64, requires_grad=True)) as gates:
        grads = torch.autograd.grad(tiny_model(**batch).loss, gates)
    for i, g in enumerate(grads):
        raw[i] = g.abs().sum(0)
    assert raw[layer, head].item() == pytest.approx(numeric, rel=1e-4)


def test_head_importance_refuses_a_pruned_model(tiny_model, tiny_batch):
    keep = torch.ones(LAYERS, HEADS, dtype=torch.bool)
    keep[0, 0] = False
    prune_heads_(tiny_model, keep)
    with pytest.raises(ValueError, match="unpruned"):
        head_importance(tiny_model, [tiny_batch])


def test_plausible_mistakes_are_one_value_error_each(tiny_model, tiny_tokenizer, tiny_batch):
    rows = make_sentences(8, seed=3)
    ds = tokenize(datasets.Dataset.from_dict({"sentence": [s for s, _ in rows], "label": [y for _, y in rows]}),
                  tiny_tokenizer, max_length=32)
    with pytest.raises(ValueError, match="with_labels=True"):
        head_importance(tiny_model, batches(ds, tiny_tokenizer, 4))
    with pytest.raises(ValueError, match="bool tensor, got list"):
        prune_heads_(tiny_model, torch.ones(LAYERS, HEADS, dtype=torch.bool).tolist())
    tiny_model.quantization = ("bnb8", None)  # as compression.quantize marks what it made
    with pytest.raises(ValueError, match="unquantized"):
        prune_heads_(tiny_model, torch.ones(LAYERS, HEADS, dtype=torch.bool))
    with pytest.raises(ValueError, match="unquantized"):
        head_importance(tiny_model, [{**tiny_batch, "labels": torch.tensor([1, 0, 1, 0])}])


@pytest.mark.parametrize("remove", [1.5, -0.5, -1, True, 1.0 + 1e-9])
def test_keep_mask_from_scores_refuses_what_prune_config_refuses(remove):
    with pytest.raises(ValueError, match="remove must be"):
        PruneConfig(remove=remove)
    with pytest.raises(ValueError, match="remove must be"):
        keep_mask_from_scores(torch.rand(LAYERS, HEADS), remove)
