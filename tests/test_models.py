"""compression.models: counting parameters, the mean-pooled heads of each family, loading a base."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.models import (
    POOLING_KEY,
    MeanPoolBertForSequenceClassification,
    MeanPoolMPNetForSequenceClassification,
    count_parameters,
    evaluating,
    load_base,
    restore_modes,
    training_modes,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- train/eval modes ---------------------------------------------------------------------------------------


class _Wrapper(torch.nn.Module):
    """What a benchmark's slowed copy or a CUDA-graph server is: a new module (so training) around a model."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **batch):
        return self.inner(**batch)


def test_evaluating_a_wrapper_hands_its_eval_model_back_in_eval_mode(tiny_model, tiny_batch):
    """Restoring only the top module's flag, recursively, once left the wrapped model training: dropout on in every
    later forward of it, timed by the CPU gate (an fp32 row ~13% slower) and random in its predictions."""
    tiny_model.config.hidden_dropout_prob = 0.5
    wrapper = _Wrapper(tiny_model.eval())
    with evaluating(wrapper):
        assert not any(m.training for m in wrapper.modules())
    assert wrapper.training and not any(m.training for m in tiny_model.modules())


@given(flags=st.lists(st.booleans(), min_size=1, max_size=64))
@settings(max_examples=25, deadline=None)
def test_modes_come_back_module_by_module(tiny_model_session, flags):
    model = tiny_model_session
    modules = list(model.modules())
    before = training_modes(model)
    try:
        for m, flag in zip(modules, flags * len(modules)):
            m.training = flag
        wanted = [m.training for m in modules]
        with evaluating(model):
            assert not any(m.training for m in modules)
        assert [m.training for m in modules] == wanted
    finally:
        restore_modes(before)


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


def test_load_base_mean_pooling_of_distilbert(tiny_distilbert_dir):
    """DistilBERT's mean-pooled head replaces its [CLS] one (pre_classifier + classifier) by one linear layer;
    an unsupported family's message is tests/test_families.py's."""
    model, _ = load_base(str(tiny_distilbert_dir), pooling="mean")
    assert type(model).__name__ == "MeanPoolDistilBertForSequenceClassification" and model.pre_classifier is None
    model, _ = load_base(str(tiny_distilbert_dir), pooling="cls")
    assert type(model).__name__ == "DistilBertForSequenceClassification"


def test_mpnet_mean_pooling_reads_the_masked_mean(tiny_mpnet_dir, tiny_mpnet_tokenizer):
    model, tokenizer = load_base(str(tiny_mpnet_dir), pooling="mean")
    assert isinstance(model, MeanPoolMPNetForSequenceClassification)
    assert isinstance(model.classifier, torch.nn.Linear)  # not MPNet's two-layer [CLS] head
    batch = dict(tokenizer(["a good movie .", "dull"], padding=True, return_tensors="pt"))
    model.eval()
    with torch.no_grad():
        hidden = model.mpnet(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = model.classifier((hidden * mask).sum(1) / mask.sum(1))
        assert torch.allclose(model(**batch).logits, expected, atol=1e-6)


# --- a given (fine-tuned) teacher: loaded whole, or refused ---------------------------------------------------


def test_load_finetuned_round_trips_a_saved_classifier(tmp_path, tiny_model, tiny_tokenizer):
    from compression.artifacts import save_classifier
    from compression.models import load_finetuned

    save_classifier(tiny_model, tiny_tokenizer, tmp_path)
    loaded, _ = load_finetuned(str(tmp_path))
    batch = tiny_tokenizer(["good film", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, tiny_model.eval()(**batch).logits)


def test_load_finetuned_refuses_a_factored_model(tmp_path, tiny_model, tiny_tokenizer):
    from compression.artifacts import save_classifier
    from compression.low_rank import LowRankConfig, factorize_embeddings_
    from compression.models import load_finetuned

    factorize_embeddings_(tiny_model, LowRankConfig(8))
    save_classifier(tiny_model, tiny_tokenizer, tmp_path)
    with pytest.raises(ValueError, match=f"^{tmp_path}: a pruned or factored model"):
        load_finetuned(str(tmp_path))


def test_load_finetuned_refuses_weights_it_would_start_at_random(tmp_path, tiny_model, tiny_tokenizer):
    from safetensors.torch import load_file, save_file

    from compression.artifacts import save_classifier
    from compression.models import load_finetuned

    save_classifier(tiny_model, tiny_tokenizer, tmp_path)
    (weights,) = tmp_path.glob("*.safetensors")
    tensors = load_file(weights)
    del tensors["classifier.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 weights missing or of another shape \(first: classifier.weight\)"):
        load_finetuned(str(tmp_path))


def _edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("loader", ["load_base", "load_finetuned"])
@pytest.mark.parametrize("damage, says", [
    (lambda f: [p.unlink() for p in f.iterdir() if p.name.startswith(("tokenizer", "vocab", "special"))],
     "no tokenizer"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:64]),
     "its safetensors weights cannot be read"),
    (lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                          "auto_map": {"AutoConfig": "evil.Config"}})),
     "its config.json asks for custom code (auto_map), which is never run here"),
    (lambda f: (f / "config.json").write_text("[]"), "its config.json is a JSON list, not an object"),
    (lambda f: _edit_config(f, model_type="nosuchfamily"), "this tool supports bert, "),
    (lambda f: _edit_config(f, hidden_size="32"), "cannot be loaded (StrictDataclassFieldValidationError: "),
    (lambda f: _edit_config(f, vocab_size=7), "cannot be loaded (its weights' shapes are not those its config"),
    (lambda f: (f / "tokenizer.json").write_text("xx"), "cannot be loaded (JSONDecodeError: "),
], ids=["no-tokenizer", "weights", "auto_map", "config-list", "family", "config-type", "shapes", "tokenizer"])
def test_a_damaged_model_folder_is_one_error_naming_it(tmp_path, tiny_model, tiny_tokenizer, loader, damage, says):
    from compression import models
    from compression.artifacts import save_classifier

    save_classifier(tiny_model, tiny_tokenizer, tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=f"^{tmp_path}: {re.escape(says)}") as err:
        getattr(models, loader)(str(tmp_path))
    assert "\n" not in str(err.value)


# --- a hub id: its snapshot in the Hugging Face cache, loaded like a folder ---------------------------------


def test_a_hub_id_loads_from_its_cached_snapshot(fake_hub, tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    from compression.artifacts import save_classifier
    from compression.models import load_base, load_finetuned

    save_classifier(tiny_model, tiny_tokenizer, tmp_path / "saved")
    fake_hub("org/tiny-sst2", tmp_path / "saved")
    monkeypatch.chdir(tmp_path)
    loaded, _ = load_finetuned("org/tiny-sst2")
    batch = tiny_tokenizer(["good film", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, tiny_model.eval()(**batch).logits)
    base, _ = load_base("org/tiny-sst2", pooling="cls")
    assert torch.equal(base.bert.embeddings.word_embeddings.weight, tiny_model.bert.embeddings.word_embeddings.weight)


def test_errors_about_a_hub_model_name_its_id_and_commit(fake_hub, tmp_path, tiny_model, tiny_config, tiny_tokenizer,
                                                         monkeypatch):
    import copy

    from transformers import BertForSequenceClassification

    from compression.models import load_base, load_finetuned

    monkeypatch.chdir(tmp_path)
    tiny_model.save_pretrained(tmp_path / "no-tokenizer")
    fake_hub("org/no-tokenizer", tmp_path / "no-tokenizer", "a" * 40)
    with pytest.raises(ValueError, match=f"^org/no-tokenizer@{'a' * 40}: no tokenizer"):
        load_base("org/no-tokenizer")
    config = copy.deepcopy(tiny_config)
    config.num_labels = 3
    BertForSequenceClassification(config).save_pretrained(tmp_path / "three")
    tiny_tokenizer.save_pretrained(tmp_path / "three")
    fake_hub("org/three", tmp_path / "three", "b" * 40)
    with pytest.raises(ValueError, match=f"^org/three@{'b' * 40}: a 3-label classifier"):
        load_finetuned("org/three")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_folder_whose_config_asks_for_half_precision_loads_in_float32(tmp_path, tiny_model, tiny_tokenizer, dtype):
    # common on the hub; transformers 5 would load it in half precision, which training and the int8 export refuse
    from compression.models import load_base, load_finetuned

    folder = tmp_path / dtype
    tiny_model.to(getattr(torch, dtype)).save_pretrained(folder)
    tiny_model.float()
    tiny_tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text()).get("dtype", "").endswith(dtype)
    for model in (load_finetuned(str(folder))[0], load_base(str(folder), pooling="mean")[0]):
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_pickled_weights_load_from_a_hub_snapshot_but_never_from_a_users_folder(fake_hub, tmp_path, tiny_model,
                                                                                tiny_tokenizer, monkeypatch):
    # A repo the hub serves without safetensors is read through torch.load(weights_only=True); the same files in
    # a folder handed in are refused: this tool reads no pickle a user gives it.
    from compression.models import load_base, load_finetuned

    folder = tmp_path / "pickled"
    tiny_model.config.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    torch.save(tiny_model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=f"^{folder}: no safetensors weights"):
        load_finetuned(str(folder))
    for pooling in ("cls", "mean"):  # as a base to fine-tune, the same words
        with pytest.raises(ValueError, match=f"^{folder}: no safetensors weights"):
            load_base(str(folder), pooling=pooling)
    fake_hub("org/pickled", folder)
    monkeypatch.chdir(tmp_path)
    loaded, _ = load_finetuned("org/pickled")
    batch = tiny_tokenizer(["good film", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, tiny_model.eval()(**batch).logits)
