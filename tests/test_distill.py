"""Distillation: the loss's invariants, the student's construction, the Trainer subclass."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_sentences
from compression.data import tokenize
from compression.distill import (
    FEATURE_ROW,
    PROJECTION,
    DistillConfig,
    distill,
    distillation_loss,
    feature_loss,
    hidden_loss,
    layer_map,
    make_student,
    teacher_outputs,
    with_feature_rows,
    with_teacher_logits,
)
from compression.models import masked_mean
from compression.measure import model_device, to_device
from compression.train import TrainConfig


def logits(batch: int, classes: int):
    return st.lists(st.floats(-20, 20, allow_nan=False), min_size=batch * classes, max_size=batch * classes).map(
        lambda v: torch.tensor(v, dtype=torch.float64).view(batch, classes)
    )


@st.composite
def pairs(draw):
    b, c = draw(st.integers(1, 8)), draw(st.integers(2, 5))
    return draw(logits(b, c)), draw(logits(b, c)), torch.tensor(draw(st.lists(st.integers(0, c - 1), min_size=b,
                                                                             max_size=b)))


@settings(max_examples=100, deadline=None)
@given(case=pairs(), t=st.floats(0.1, 20), alpha=st.floats(0, 1))
def test_loss_is_never_negative(case, t, alpha):
    s, te, y = case
    assert distillation_loss(s, te, y, t, alpha).item() >= -1e-9


@settings(max_examples=100, deadline=None)
@given(case=pairs(), t=st.floats(0.1, 20))
def test_loss_is_zero_when_student_equals_teacher_and_labels_weigh_nothing(case, t):
    _, te, y = case
    assert distillation_loss(te.clone(), te, y, t, alpha=1.0).item() == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(case=pairs())
def test_t_squared_scaling_tends_to_logit_matching(case):
    """As T grows, T² * KL(teacher_T || student_T) -> mean over the batch of ||Δz - mean(Δz)||² / (2C).

    This is why the T² factor is there (Hinton et al. 2015): the soft term keeps its size whatever T is.
    """
    s, te, y = case
    c = s.shape[1]
    diff = (te - s) - (te - s).mean(dim=1, keepdim=True)
    limit = (diff.pow(2).sum(dim=1) / (2 * c)).mean().item()
    got = distillation_loss(s, te, y, temperature=1e4, alpha=1.0).item()
    # the expansion's error is O(max|Δz| / T) relative: logits within ±20 keep it under 1%
    assert got == pytest.approx(limit, rel=1e-2, abs=1e-6)  # abs: float64 cancellation at tiny Δz


def test_loss_example_mixes_soft_and_hard_terms():
    s = torch.tensor([[2.0, 0.0]])
    te = torch.tensor([[0.0, 2.0]])
    y = torch.tensor([0])
    t, alpha = 2.0, 0.25
    kd = F.kl_div(F.log_softmax(s / t, -1), F.softmax(te / t, -1), reduction="batchmean") * t * t
    expected = alpha * kd + (1 - alpha) * F.cross_entropy(s, y)
    assert distillation_loss(s, te, y, t, alpha).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("t", [0.0, -1.0])
def test_temperature_must_be_positive(t):
    with pytest.raises(ValueError, match=f"temperature must be > 0, got {t}"):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), t, 0.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=t)


def test_layer_map_takes_every_other_layer_by_default():
    assert layer_map(6, 3) == [0, 2, 4]
    assert layer_map(12, 6) == [0, 2, 4, 6, 8, 10]
    assert layer_map(4, 4) == [0, 1, 2, 3]
    assert layer_map(6, 2) == [0, 3]


def test_student_cannot_have_more_layers_than_teacher(tiny_model_session):
    with pytest.raises(ValueError, match="a student of 5 layers cannot come from a teacher of 4"):
        make_student(tiny_model_session, 5)


def test_student_keeping_every_layer_reproduces_the_teacher(tiny_model_session, tiny_batch):
    student = make_student(tiny_model_session, 4)
    assert torch.equal(student(**tiny_batch).logits, tiny_model_session(**tiny_batch).logits)


def test_student_copies_the_mapped_layers_weights(tiny_model_session):
    student = make_student(tiny_model_session, 2)
    assert student.config.num_hidden_layers == 2
    assert tiny_model_session.config.num_hidden_layers == 4  # the teacher is left alone
    for s_layer, t_index in zip(student.bert.encoder.layer, [0, 2]):
        t_layer = tiny_model_session.bert.encoder.layer[t_index]
        assert torch.equal(s_layer.attention.self.query.weight, t_layer.attention.self.query.weight)
        assert s_layer.attention.self.query.weight.data_ptr() != t_layer.attention.self.query.weight.data_ptr()


def test_hidden_loss_is_zero_for_the_teachers_own_states_and_positive_otherwise(tiny_model_session, tiny_batch):
    teacher_out = tiny_model_session(**tiny_batch, output_hidden_states=True)
    student = make_student(tiny_model_session, 2)
    student_out = student(**tiny_batch, output_hidden_states=True)
    same = hidden_loss(teacher_out.hidden_states, teacher_out.hidden_states, [0, 1, 2, 3],
                       tiny_batch["attention_mask"])
    assert same.item() == 0.0
    assert hidden_loss(student_out.hidden_states, teacher_out.hidden_states, [0, 2],
                       tiny_batch["attention_mask"]).item() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_layers": 0}, "num_layers"), ({"alpha": 1.5}, "alpha"), ({"hidden_weight": -1}, "hidden_weight"),
     ({"feature_weight": -0.5}, "feature_weight"), ({"feature_weight": float("nan")}, "feature_weight")],
)
def test_distill_config_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**kwargs)


def test_distillation_moves_the_student_towards_the_teacher(tiny_model_session, tiny_tokenizer):
    rows = make_sentences(64, seed=3)
    ds = datasets.Dataset.from_dict({"sentence": [s for s, _ in rows], "label": [y for _, y in rows]})
    train = tokenize(ds, tiny_tokenizer)
    teacher = copy.deepcopy(tiny_model_session)
    with torch.no_grad():  # a random classifier is almost uniform; make the teacher opinionated
        teacher.classifier.weight.mul_(200.0)
    student = make_student(teacher, 2)
    with torch.no_grad():  # start the student far from the teacher: it must learn the teacher's outputs
        student.classifier.weight.zero_()
    probe = dict(tiny_tokenizer([s for s, _ in rows], padding=True, return_tensors="pt"))

    def gap():  # (the Trainer moves both models to the GPU where there is one)
        with torch.no_grad():
            return F.kl_div(F.log_softmax(student(**to_device(probe, model_device(student))).logits.cpu(), -1),
                            F.log_softmax(teacher(**to_device(probe, model_device(teacher))).logits.cpu(), -1),
                            reduction="batchmean", log_target=True).item()

    before = gap()
    config = DistillConfig(num_layers=2, temperature=2.0, alpha=1.0, hidden_weight=0.1)
    assert before > 0.01
    teacher.train()  # as a caller might hand it over: the live teacher must come back as it was given
    distill(teacher, student, tiny_tokenizer, train, config,
            TrainConfig(learning_rate=5e-3, epochs=3, batch_size=16, warmup_ratio=0.0))
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert model_device(teacher) == torch.device("cpu")
    teacher.eval()
    assert gap() < before * 0.7


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 6), ds=st.integers(1, 8), dt=st.integers(1, 8), seed=st.integers(0, 2**16),
       scale=st.floats(0.01, 100))
def test_feature_loss_is_a_scale_free_cosine_distance(b, ds, dt, seed, scale):
    """In [0, 2]; 0 when the projection already points where the teacher does, whatever the teacher's scale."""
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(b, ds, generator=g), torch.randn(b, dt, generator=g)
    projection = torch.nn.Linear(ds, dt)
    loss = feature_loss(student, teacher, projection).item()
    assert -1e-6 <= loss <= 2 + 1e-6
    assert feature_loss(student, teacher * scale, projection).item() == pytest.approx(loss, abs=1e-5)
    with torch.no_grad():
        aligned = projection(student)
    assert feature_loss(student, aligned * scale, projection).item() == pytest.approx(0.0, abs=1e-5)


def test_feature_loss_skips_rows_without_a_teacher_vector():
    projection = torch.nn.Linear(3, 2)
    student = torch.randn(4, 3)
    with torch.no_grad():
        target = projection(student)
    target[1] = -target[1]  # the one wrong row, masked out below
    present = torch.tensor([True, False, True, True])
    assert feature_loss(student, target, projection, present).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_loss(student, target, projection).item() == pytest.approx(0.5, abs=1e-5)  # (0+2+0+0)/4
    none = feature_loss(student, target, projection, torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad  # a batch of augmented rows alone still back-propagates


def test_teacher_outputs_pool_the_last_layer_over_real_tokens(tiny_mean_model_session, tiny_tokenizer):
    rows = make_sentences(20, seed=5)
    ds = tokenize(datasets.Dataset.from_dict({"sentence": [s for s, _ in rows], "label": [y for _, y in rows]}),
                  tiny_tokenizer)
    model = tiny_mean_model_session
    logits, pooled = teacher_outputs(model, ds, tiny_tokenizer, batch_size=6, features=True)
    alone, none = teacher_outputs(model, ds, tiny_tokenizer, batch_size=6)
    assert torch.equal(logits, alone) and none is None  # the vectors cost the logits nothing
    for i in (0, 7, 19):  # each row alone, unpadded, in the split's order
        one = dict(tiny_tokenizer([rows[i][0]], return_tensors="pt"))
        with torch.no_grad():
            hidden = model(**one, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(pooled[i], masked_mean(hidden, one["attention_mask"])[0], atol=1e-5, rtol=1e-4)
        # the mean-pooled classifier reads exactly this vector
        with torch.no_grad():
            torch.testing.assert_close(logits[i], model.classifier(pooled[i].clone()), atol=1e-5, rtol=1e-4)


def test_masked_mean_ignores_padding():
    hidden = torch.arange(12.0).view(1, 4, 3)
    assert masked_mean(hidden, torch.tensor([[1, 1, 0, 0]])).tolist() == [[1.5, 2.5, 3.5]]
    assert masked_mean(hidden, torch.tensor([[0, 0, 0, 0]])).tolist() == [[0.0, 0.0, 0.0]]


def _feature_rows(tokenizer, n=48, seed=9):
    rows = make_sentences(n, seed=seed)
    ds = tokenize(datasets.Dataset.from_dict({"sentence": [s for s, _ in rows], "label": [y for _, y in rows]}),
                  tokenizer)
    return with_feature_rows(with_teacher_logits(ds, torch.zeros(n, 2)))


def test_distilling_with_features_aligns_the_students_pooled_vector_across_widths(tiny_mean_model_session,
                                                                                    tiny_tokenizer):
    """The teacher's vectors are wider than the student's (48 vs 32): the learnt projection bridges them and pulls
    the student's own pooled vector towards them, which logits alone do not; the projection is gone afterwards."""
    train = _feature_rows(tiny_tokenizer, n=160)
    sentences = [s for s, _ in make_sentences(160, seed=9)]  # train's sentences, in its order
    probe = dict(tiny_tokenizer(sentences, padding=True, return_tensors="pt"))
    # the "teacher's" vectors, 48 wide: a fixed nonlinear function of each sentence's words
    table = torch.randn(len(tiny_tokenizer), 48, generator=torch.Generator().manual_seed(7))
    features = torch.stack([torch.tanh(table[tiny_tokenizer.convert_tokens_to_ids(s.split())].sum(0))
                            for s in sentences])

    def trained(weight):
        student = copy.deepcopy(tiny_mean_model_session)
        torch.manual_seed(0)
        distill(None, student, tiny_tokenizer, train, DistillConfig(alpha=1.0, feature_weight=weight),
                TrainConfig(learning_rate=1e-2, epochs=8, batch_size=16, warmup_ratio=0.0, bf16=False),
                features=features)
        return student

    def misfit(student):  # the cosine distance left by the best linear map of its vectors onto the teacher's
        with torch.no_grad():
            s_out = student(**to_device(probe, model_device(student)), output_hidden_states=True)
            vectors = masked_mean(s_out.hidden_states[-1], probe["attention_mask"].to(model_device(student))).cpu()
        design = torch.cat([vectors, torch.ones(len(vectors), 1)], 1)
        solution = torch.linalg.lstsq(design, features).solution
        return (1 - F.cosine_similarity(design @ solution, features, dim=-1)).mean().item()

    aligned, control = trained(1.0), trained(0.0)
    assert not hasattr(aligned, PROJECTION)
    assert not any(PROJECTION in name for name in aligned.state_dict())
    assert misfit(aligned) < 0.7 * misfit(control)


def test_feature_rows_without_a_vector_train_on_logits_alone(tiny_mean_model_session, tiny_tokenizer):
    """Rows marked -1 (no teacher vector) leave the feature term out; with every row so marked the student learns
    exactly what logits alone teach it (the projection takes no part)."""
    train = _feature_rows(tiny_tokenizer)
    optim = TrainConfig(learning_rate=1e-3, epochs=1, batch_size=16, warmup_ratio=0.0, bf16=False)
    plain, marked = copy.deepcopy(tiny_mean_model_session), copy.deepcopy(tiny_mean_model_session)
    torch.manual_seed(0)
    distill(None, plain, tiny_tokenizer, train, DistillConfig(alpha=1.0), optim)
    torch.manual_seed(0)
    torch.nn.Linear(32, 48)  # the projection's draw, so both runs see the same random stream afterwards
    distill(None, marked, tiny_tokenizer, with_feature_rows(train, [-1] * len(train)),
            DistillConfig(alpha=1.0, feature_weight=1.0), optim, features=torch.randn(len(train), 48))
    for (name, a), (_, b) in zip(plain.state_dict().items(), marked.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_feature_weight_needs_the_vectors_and_their_rows(tiny_mean_model_session, tiny_tokenizer):
    train = _feature_rows(tiny_tokenizer, n=8)
    config, optim = DistillConfig(feature_weight=1.0), TrainConfig(epochs=1, batch_size=4, bf16=False)
    student = copy.deepcopy(tiny_mean_model_session)
    with pytest.raises(ValueError, match="feature_weight"):
        distill(None, student, tiny_tokenizer, train, config, optim)  # no vectors
    with pytest.raises(ValueError, match=FEATURE_ROW):
        distill(None, student, tiny_tokenizer, train.remove_columns(FEATURE_ROW), config, optim,
                features=torch.zeros(8, 4))
    bad = torch.zeros(8, 4)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        distill(None, student, tiny_tokenizer, train, config, optim, features=bad)
    with pytest.raises(ValueError, match="feature rows"):
        with_feature_rows(train, [0, 1])


def test_a_student_is_not_cut_from_a_pruned_teacher(tiny_model):
    """Its per-layer records of the kept heads would not follow the layers the student keeps."""
    from compression.prune import prune_heads_

    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[1, 2] = False
    prune_heads_(tiny_model, keep)
    with pytest.raises(ValueError, match="unpruned teacher; this one has kept_heads"):
        make_student(tiny_model, 2)


def test_distill_refuses_logits_of_another_class_count(tiny_model, tiny_tokenizer):
    rows = make_sentences(8, seed=2)
    ds = tokenize(datasets.Dataset.from_dict({"sentence": [s for s, _ in rows], "label": [y for _, y in rows]}),
                  tiny_tokenizer, max_length=32)
    with pytest.raises(ValueError, match="3 classes; the student has 2"):
        distill(None, tiny_model, tiny_tokenizer, with_teacher_logits(ds, torch.randn(8, 3)), DistillConfig(),
                TrainConfig(epochs=1))


def test_teacher_outputs_hand_the_teacher_back_in_its_mode(tiny_model, tiny_tokenizer):
    rows = make_sentences(8, seed=2)
    ds = tokenize(datasets.Dataset.from_dict({"sentence": [s for s, _ in rows], "label": [y for _, y in rows]}),
                  tiny_tokenizer, max_length=32)
    tiny_model.eval()
    expected, _ = teacher_outputs(tiny_model, ds, tiny_tokenizer)
    tiny_model.train()
    logits, _ = teacher_outputs(tiny_model, ds, tiny_tokenizer)
    assert tiny_model.training
    assert torch.equal(logits, expected)  # computed in eval mode all the same
