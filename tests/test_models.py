"""compression.models: resolving bases, counting, saving/loading, sizing, fingerprints and read_json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import models
from compression.models import (
    MB,
    POOLING_KEY,
    MeanPoolBertForSequenceClassification,
    base_fingerprint,
    count_parameters,
    default_base_dir,
    load_base,
    load_classifier,
    read_json,
    resolve_base,
    save_classifier,
    size_mb,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- resolve_base ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["./nope", "/no/such", "~/definitely-not-a-model-folder-xyz", "a/b/c"])
def test_resolve_base_missing_local_path(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        resolve_base(base)
    assert str(err.value) == f"{base}: no such model folder"


def test_resolve_base_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="no config.json") as err:
        resolve_base(str(tmp_path))
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("hub_id", ["bert-base-uncased", "google/bert_uncased_L-2_H-128_A-2"])
def test_resolve_base_hub_id_returned_as_is(hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_base(hub_id) == hub_id


def test_resolve_base_local_folder(tiny_base_dir):
    assert resolve_base(str(tiny_base_dir)) == str(tiny_base_dir)


def test_resolve_base_none_is_default_folder():
    assert resolve_base(None) == str(default_base_dir())


def test_default_base_dir_has_config_and_weights():
    folder = default_base_dir()
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["hidden_size"] == 384 and config["num_hidden_layers"] == 6


def test_default_base_dir_without_package(monkeypatch):
    monkeypatch.setattr(models, "DEFAULT_BASE_PACKAGE", "no_such_package_for_tests_xyz")
    with pytest.raises(ValueError, match="no-such-package-for-tests-xyz"):
        default_base_dir()


# --- counting, saving, loading, sizing ---------------------------------------------------------------------


def test_count_parameters(tiny_model):
    expected = sum(p.numel() for p in tiny_model.parameters())
    assert count_parameters(tiny_model) == expected
    # hand count for the tiny config: embeddings + 4 layers + pooler + 2-way head
    v, h, i, pos, types = tiny_model.config.vocab_size, 32, 37, 64, 2
    emb = (v + pos + types) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    assert expected == emb + 4 * layer + (h * h + h) + (h * 2 + 2)


def test_count_parameters_plain_module():
    assert count_parameters(torch.nn.Linear(3, 5)) == 20
    assert count_parameters(torch.nn.ReLU()) == 0


def test_save_and_load_classifier_round_trip(any_tiny_model, tiny_tokenizer, tiny_batch, tmp_path):
    folder = tmp_path / "clf"
    save_classifier(any_tiny_model, tiny_tokenizer, folder)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    loaded, tokenizer = load_classifier(folder)
    assert not loaded.training
    with torch.no_grad():
        expected = any_tiny_model(**tiny_batch).logits
        got = loaded(**tiny_batch).logits
    assert torch.equal(expected, got)
    assert tokenizer("a good movie .")["input_ids"] == tiny_tokenizer("a good movie .")["input_ids"]
    assert count_parameters(loaded) == count_parameters(any_tiny_model)


# --- mean pooling ------------------------------------------------------------------------------------------


def test_mean_pooling_reads_the_masked_mean_of_the_last_layer(tiny_mean_model_session, tiny_batch):
    model = tiny_mean_model_session
    with torch.no_grad():
        hidden = model.bert(**tiny_batch).last_hidden_state  # [B, T, H]
        mask = tiny_batch["attention_mask"].unsqueeze(-1).float()
        expected = model.classifier((hidden * mask).sum(1) / mask.sum(1))
        assert torch.allclose(model(**tiny_batch).logits, expected, atol=1e-6)


def test_mean_pooling_loss_is_cross_entropy(tiny_mean_model_session, tiny_batch):
    labels = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        out = tiny_mean_model_session(**tiny_batch, labels=labels)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(st.integers(5, 20), min_size=1, max_size=12), pad=st.integers(1, 10))
def test_mean_pooling_ignores_padding(tiny_mean_model_session, ids, pad):
    """Padding a sentence never changes its logits: masked positions are out of the mean (and of attention)."""
    tokens = torch.tensor([[2, *ids, 3]])
    padded = torch.cat([tokens, torch.zeros(1, pad, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(tokens), torch.zeros(1, pad, dtype=torch.long)], dim=1)
    with torch.no_grad():
        short = tiny_mean_model_session(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits
        long = tiny_mean_model_session(input_ids=padded, attention_mask=mask).logits
    assert torch.allclose(short, long, atol=1e-5)


def test_mean_pooled_model_has_no_pooler_and_says_so(tiny_mean_model_session, tiny_model_session, tiny_config):
    h = tiny_config.hidden_size
    assert tiny_mean_model_session.bert.pooler is None
    assert count_parameters(tiny_mean_model_session) == count_parameters(tiny_model_session) - (h * h + h)
    assert getattr(tiny_mean_model_session.config, POOLING_KEY) == "mean"
    assert not hasattr(tiny_config, POOLING_KEY)  # the caller's config is left alone


def test_load_base_with_mean_pooling(tiny_base_dir):
    model, _ = load_base(str(tiny_base_dir), pooling="mean")
    assert isinstance(model, MeanPoolBertForSequenceClassification)
    cls_model, _ = load_base(str(tiny_base_dir))
    assert type(cls_model).__name__ == "BertForSequenceClassification"
    # the encoder comes from the base either way; only the head is new
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight,
                       cls_model.bert.encoder.layer[0].attention.self.query.weight)


def test_load_base_rejects_an_unknown_pooling(tiny_base_dir):
    with pytest.raises(ValueError, match="pooling must be one of cls, mean, got 'max'"):
        load_base(str(tiny_base_dir), pooling="max")


def test_load_base_mean_pooling_needs_bert(tiny_distilbert_dir):
    with pytest.raises(ValueError, match="mean pooling needs a BERT model, this one is 'distilbert'"):
        load_base(str(tiny_distilbert_dir), pooling="mean")
    model, _ = load_base(str(tiny_distilbert_dir), pooling="cls")
    assert type(model).__name__ == "DistilBertForSequenceClassification"


# --- size_mb -----------------------------------------------------------------------------------------------


def test_size_mb_matches_safetensors_file(tiny_model, tiny_tokenizer, tmp_path):
    folder = tmp_path / "clf"
    save_classifier(tiny_model, tiny_tokenizer, folder)
    weights = folder / "model.safetensors"
    assert size_mb(folder) == pytest.approx(weights.stat().st_size / 2**20, rel=1e-12)
    assert MB == 2**20
    # at least 4 bytes per fp32 parameter, plus a small header (and buffers)
    fp32_bytes = count_parameters(tiny_model) * 4
    assert fp32_bytes / 2**20 <= size_mb(folder) <= (fp32_bytes + 64 * 1024) / 2**20


def test_size_mb_counts_every_weight_file(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "model.onnx").write_bytes(b"\0" * 300)
    (tmp_path / "model.onnx.data").write_bytes(b"\0" * 2000)
    (tmp_path / "config.json").write_bytes(b"\0" * 5000)  # not a weight file
    assert size_mb(tmp_path) == pytest.approx(3300 / 2**20)


def test_size_mb_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weight file") as err:
        size_mb(tmp_path)
    assert str(tmp_path) in str(err.value)


# --- base_fingerprint --------------------------------------------------------------------------------------


def test_base_fingerprint_hub_id():
    assert base_fingerprint("bert-base-uncased") == "hub:bert-base-uncased"


def test_base_fingerprint_local_changes_with_config(tiny_base_dir, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(tiny_base_dir, folder)
    before = base_fingerprint(str(folder))
    assert len(before) == 64 and before == base_fingerprint(str(tiny_base_dir))
    # files that are neither config nor weights do not count
    (folder / "notes.txt").write_text("hello")
    assert base_fingerprint(str(folder)) == before
    config = json.loads((folder / "config.json").read_text())
    config["hidden_dropout_prob"] = 0.25
    (folder / "config.json").write_text(json.dumps(config))
    assert base_fingerprint(str(folder)) != before


def test_base_fingerprint_local_changes_with_weights(tiny_base_dir, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(tiny_base_dir, folder)
    before = base_fingerprint(str(folder))
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert base_fingerprint(str(folder)) != before


# --- read_json ---------------------------------------------------------------------------------------------


def test_read_json_ok(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": [1, 2], "b": {"c": null}}')
    assert read_json(path) == {"a": [1, 2], "b": {"c": None}}
    assert read_json(str(path)) == {"a": [1, 2], "b": {"c": None}}


def test_read_json_missing(tmp_path):
    path = tmp_path / "missing.json"
    with pytest.raises(ValueError) as err:
        read_json(path)
    assert str(err.value) == f"{path}: no such file"


@pytest.mark.parametrize("content", [b"{not json", b"", b'{"a": 1,}', b"\xff\xfe{}"])
def test_read_json_invalid(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not valid JSON") as err:
        read_json(path)
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize("content", ["[1, 2]", "3", '"text"', "null"])
def test_read_json_top_level_not_object(tmp_path, content):
    path = tmp_path / "list.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="expected a JSON object") as err:
        read_json(path)
    assert str(path) in str(err.value)
