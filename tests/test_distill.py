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
from compression.distill import DistillConfig, distill, distillation_loss, hidden_loss, layer_map, make_student
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
    [({"num_layers": 0}, "num_layers"), ({"alpha": 1.5}, "alpha"), ({"hidden_weight": -1}, "hidden_weight")],
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
    distill(teacher, student, tiny_tokenizer, train, config,
            TrainConfig(learning_rate=5e-3, epochs=3, batch_size=16, warmup_ratio=0.0))
    assert gap() < before * 0.7
