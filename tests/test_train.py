"""compression.train: TrainConfig validation, the training slice, TrainingArguments, and a tiny fine-tune."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time

import datasets
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import compression.train as train_module
from compression.data import tokenize
from compression.train import TrainConfig, device_options, finetune, resolve_precision, training_arguments, training_rows
from conftest import make_sentences


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- TrainConfig -------------------------------------------------------------------------------------------


def test_defaults_are_valid():
    config = TrainConfig()
    assert (config.learning_rate, config.epochs, config.batch_size, config.max_rows, config.seed) == (
        5e-5, 5.0, 32, None, 42)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("learning_rate", 0),
        ("learning_rate", -1e-5),
        ("learning_rate", float("nan")),
        ("epochs", 0),
        ("epochs", -1.0),
        ("batch_size", 0),
        ("batch_size", -8),
        ("warmup_ratio", -0.1),
        ("warmup_ratio", 1.0),
        ("warmup_ratio", 1.5),
        ("max_rows", 0),
        ("max_rows", -100),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{field: value})
    assert str(err.value).startswith(f"{field} must be")
    assert str(value) in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"warmup_ratio": 0.0}, {"warmup_ratio": 0.99}, {"max_rows": 1}, {"batch_size": 1}, {"epochs": 0.5}],
)
def test_edge_values_accepted(kwargs):
    config = TrainConfig(**kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().learning_rate = 1.0  # type: ignore[misc]


# --- training_rows -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_split():
    rows = make_sentences(100, seed=3)
    return datasets.Dataset.from_dict({"sentence": [s for s, _ in rows], "label": [label for _, label in rows],
                                       "id": list(range(len(rows)))})


def test_training_rows_all_when_unlimited(train_split):
    assert training_rows(train_split, TrainConfig()) is train_split
    assert training_rows(train_split, TrainConfig(max_rows=100)) is train_split
    assert training_rows(train_split, TrainConfig(max_rows=10_000)) is train_split


def test_training_rows_seeded_slice(train_split):
    a = training_rows(train_split, TrainConfig(max_rows=30, seed=1))
    b = training_rows(train_split, TrainConfig(max_rows=30, seed=1))
    c = training_rows(train_split, TrainConfig(max_rows=30, seed=2))
    assert len(a) == 30
    assert a["id"] == b["id"]
    assert a["id"] != c["id"]
    assert len(set(a["id"])) == 30  # no repeats
    assert a["id"] != list(range(30))  # shuffled, not the head of train
    # a row keeps its sentence and label
    for i, sentence, label in zip(a["id"], a["sentence"], a["label"]):
        assert (sentence, label) == (train_split[i]["sentence"], train_split[i]["label"])


@settings(max_examples=20, deadline=None)
@given(max_rows=st.integers(1, 99), seed=st.integers(0, 2**31 - 1))
def test_training_rows_property(train_split, max_rows, seed):
    out = training_rows(train_split, TrainConfig(max_rows=max_rows, seed=seed))
    assert len(out) == max_rows
    assert len(set(out["id"])) == max_rows
    assert out["id"] == training_rows(train_split, TrainConfig(max_rows=max_rows, seed=seed))["id"]


# --- training_arguments ------------------------------------------------------------------------------------


def test_training_arguments_follow_config(tmp_path):
    config = TrainConfig(learning_rate=1e-3, epochs=2.0, batch_size=8, weight_decay=0.1, seed=7)
    args = training_arguments(config, str(tmp_path), use_cpu=True)
    assert args.learning_rate == 1e-3
    assert args.num_train_epochs == 2.0
    assert args.per_device_train_batch_size == 8
    assert args.weight_decay == 0.1
    assert args.seed == 7 and args.data_seed == 7
    assert args.use_cpu is True
    assert str(args.save_strategy).lower().endswith("no")
    assert args.output_dir == str(tmp_path)
    assert args.get_warmup_steps(1000) == 60  # warmup_ratio 0.06 of the total steps
    assert str(args.train_sampling_strategy).endswith("group_by_length")
    assert args.logging_nan_inf_filter is False  # a host sync per step on a GPU
    assert args.torch_compile is False  # compiling is asked for (benchmarks.train_speed --compile), never implied
    assert training_arguments(config, str(tmp_path), use_cpu=True, compile_step=True).torch_compile is True


def test_training_uses_the_fused_optimizer_everywhere_and_tf32_on_new_gpus(tmp_path, monkeypatch):
    assert device_options(use_cpu=True) == {"optim": "adamw_torch_fused"}
    assert training_arguments(TrainConfig(), str(tmp_path), use_cpu=True).optim == "adamw_torch_fused"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # Hopper
    assert device_options(use_cpu=False) == {"optim": "adamw_torch_fused", "tf32": True}
    assert device_options(use_cpu=True) == {"optim": "adamw_torch_fused"}  # a GPU machine told to train on CPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))  # a T4: no TF32
    assert device_options(use_cpu=False) == {"optim": "adamw_torch_fused"}


def test_bf16_follows_config_and_hardware(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "bf16_supported", lambda use_cpu: True)
    assert training_arguments(TrainConfig(), str(tmp_path), use_cpu=True).bf16 is True
    assert training_arguments(TrainConfig(bf16=False), str(tmp_path), use_cpu=True).bf16 is False
    monkeypatch.setattr(train_module, "bf16_supported", lambda use_cpu: False)
    assert training_arguments(TrainConfig(), str(tmp_path), use_cpu=True).bf16 is False


def test_resolve_precision_only_ever_switches_bf16_off(monkeypatch):
    config = TrainConfig(learning_rate=1e-3)
    monkeypatch.setattr(train_module, "bf16_supported", lambda use_cpu: True)
    assert resolve_precision(config, use_cpu=True) == config
    assert resolve_precision(dataclasses.replace(config, bf16=False), use_cpu=True).bf16 is False
    monkeypatch.setattr(train_module, "bf16_supported", lambda use_cpu: False)
    assert resolve_precision(config, use_cpu=True) == dataclasses.replace(config, bf16=False)


# --- finetune ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenized_train(tiny_tokenizer):
    rows = make_sentences(64, seed=4)
    ds = datasets.Dataset.from_dict({"sentence": [s for s, _ in rows], "label": [label for _, label in rows]})
    return tokenize(ds, tiny_tokenizer, max_length=32)


def _train_copy(tiny_model_session, tiny_tokenizer, tokenized_train, config):
    torch.manual_seed(config.seed)
    model = copy.deepcopy(tiny_model_session)
    return finetune(model, tiny_tokenizer, tokenized_train, config)


def test_finetune_changes_weights_and_is_deterministic(tiny_model_session, tiny_tokenizer, tokenized_train,
                                                       tiny_batch):
    config = TrainConfig(learning_rate=1e-3, epochs=1, batch_size=16, seed=5)
    before = {k: v.clone() for k, v in tiny_model_session.state_dict().items()}

    first = _train_copy(tiny_model_session, tiny_tokenizer, tokenized_train, config)
    second = _train_copy(tiny_model_session, tiny_tokenizer, tokenized_train, config)

    assert not first.training and not second.training  # returned in eval mode
    after = {k: v.cpu() for k, v in first.state_dict().items()}  # (the Trainer moves it to the GPU if there is one)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "classifier.weight" in changed
    assert any(k.startswith("bert.encoder.layer.0.") for k in changed)
    # the session model itself is untouched
    assert all(torch.equal(before[k], v) for k, v in tiny_model_session.state_dict().items())

    for key, value in after.items():
        assert torch.equal(value, second.state_dict()[key].cpu()), key
    first, second = first.cpu(), second.cpu()
    with torch.no_grad():
        assert torch.equal(first(**tiny_batch).logits, second(**tiny_batch).logits)
        assert not torch.equal(first(**tiny_batch).logits, tiny_model_session(**tiny_batch).logits)


def test_a_compiled_step_trains_the_model_handed_in_as_the_eager_step_does(
        tiny_model_session, tiny_tokenizer, tokenized_train, tiny_batch, monkeypatch):
    # dynamo's "eager" backend traces the step as inductor would and runs the traced ops as they are: the
    # plumbing (the Trainer compiling its copy, the caller's module trained and handed back plain) without
    # inductor's minute of compiling on a CPU
    made, real = [], train_module.TrainingArguments

    def eager_backend(*args, **kwargs):
        made.append(real(*args, **kwargs))
        if made[-1].torch_compile:
            made[-1].torch_compile_backend = "eager"
        return made[-1]

    monkeypatch.setattr(train_module, "TrainingArguments", eager_backend)
    config = TrainConfig(learning_rate=1e-3, epochs=1, batch_size=16, seed=5, bf16=False)
    torch.manual_seed(config.seed)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = finetune(copy.deepcopy(tiny_model_session), tiny_tokenizer, tokenized_train, config, compile_step=True)
    traced = sum(torch._dynamo.utils.counters["frames"].values())
    eager = _train_copy(tiny_model_session, tiny_tokenizer, tokenized_train, config)

    assert [a.torch_compile for a in made] == [True, False]
    assert traced > 0  # dynamo did trace the forward
    assert type(compiled) is type(tiny_model_session) and not compiled.training  # not dynamo's wrapper
    compiled, eager = compiled.cpu(), eager.cpu()
    with torch.no_grad():
        got, want = compiled(**tiny_batch).logits, eager(**tiny_batch).logits
    assert not torch.equal(got, tiny_model_session(**tiny_batch).logits)  # it trained
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("verbosity", ["warning", "error"])  # error: as the CLI sets it
def test_a_model_trained_in_bf16_computes_in_fp32_afterwards_and_nothing_is_printed(
        tiny_model_session, tiny_tokenizer, tokenized_train, tiny_batch, monkeypatch, capsys, verbosity):
    """accelerate wraps the model's forward in bf16 autocast for training; finetune takes the wrapper off again (a
    wrapped model exports to ONNX as garbage, or not at all). The Trainer's loss reports go to logging, not stdout,
    and its progress bar to stderr, whatever transformers' verbosity."""
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity(getattr(transformers.logging, verbosity.upper()))
    monkeypatch.setattr(train_module, "bf16_supported", lambda use_cpu: True)
    config = TrainConfig(learning_rate=1e-3, epochs=1, batch_size=16, seed=5)
    try:
        model = finetune(copy.deepcopy(tiny_model_session), tiny_tokenizer, tokenized_train, config, use_cpu=True)
    finally:
        transformers.logging.set_verbosity(before)
    plain = copy.deepcopy(tiny_model_session)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(**tiny_batch).logits, plain(**tiny_batch).logits)
    printed = capsys.readouterr()
    assert "loss" not in printed.out
    assert "100%" in printed.err  # the bar


class _SlowSteps(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.15)  # slower than tqdm's 0.1 s between redraws


def test_the_bar_is_not_redrawn_every_step_into_a_log_file(
        tiny_model_session, tiny_tokenizer, tokenized_train, capsys, caplog):
    """stderr that is not a terminal (capsys's, a CI log, `2> run.log`) keeps every redraw: with tqdm's defaults it
    got one per step. The loss reports, at -v, still reach logging."""
    config = TrainConfig(learning_rate=1e-3, epochs=1, batch_size=8, seed=5)
    with caplog.at_level(logging.INFO, logger="compression.train"):
        finetune(copy.deepcopy(tiny_model_session), tiny_tokenizer, tokenized_train, config, use_cpu=True,
                 callbacks=[_SlowSteps()])
    err = capsys.readouterr().err
    assert "8/8" in err and err.count("/8 [") <= 4, err  # the first draw, a redraw under a log line, the last
    assert any("train_loss" in r.getMessage() for r in caplog.records)


def test_a_model_whose_training_fails_is_handed_back_unwrapped_and_in_eval_mode(
        tiny_model_session, tiny_tokenizer, tokenized_train, tiny_batch, monkeypatch):
    """A failure mid-training (here labels the 2-label head cannot take) must not leave the bf16 autocast wrapper."""
    monkeypatch.setattr(train_module, "bf16_supported", lambda use_cpu: True)
    model = copy.deepcopy(tiny_model_session)
    bad = tokenized_train.map(lambda row: {"labels": 7})
    with pytest.raises(Exception):
        finetune(model, tiny_tokenizer, bad, TrainConfig(epochs=1, batch_size=16), use_cpu=True)
    assert not model.training
    plain = copy.deepcopy(tiny_model_session)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(**tiny_batch).logits, plain(**tiny_batch).logits)
