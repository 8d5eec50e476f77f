"""Encoder families: BERT, RoBERTa, MPNet and DistilBERT through every stage (classifier heads, head pruning,
save/load, int8 and bnb8, cutting a student, the whole job); another family is a one-line ValueError."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AlbertConfig, AutoModelForSequenceClassification

from compression.artifacts import load_classifier, load_model, save_classifier, save_quantized
from compression.distill import layer_map, make_student
from compression.models import count_parameters, layout_for, mean_pool_class
from compression.prune import head_gates, head_importance, kept_heads, prune_heads_
from compression.prune_ffn import kept_neurons
from compression.quantize import quantize
from compression.quant_bnb8 import Bnb8Config
from compression.quant_onnx import Int8Config
from conftest import NAMES, make_sentences, tiny_profile, write_tsv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# family -> (config fixture, tokenizer fixture, base-folder fixture)
FAMILIES = {
    "bert": ("tiny_config", "tiny_tokenizer", "tiny_base_dir"),
    "roberta": ("tiny_roberta_config", "tiny_roberta_tokenizer", "tiny_roberta_dir"),
    "mpnet": ("tiny_mpnet_config", "tiny_mpnet_tokenizer", "tiny_mpnet_dir"),
    "distilbert": ("tiny_distilbert_config", "tiny_distilbert_tokenizer", "tiny_distilbert_base_dir"),
}
SUPPORTED = "bert, roberta, mpnet, distilbert"
SENTENCES = ["a good movie .", "not very funny , too slow", "the acting is brilliant !", "dull"]


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def family_parts(request, family: str):
    """(config, tokenizer, batch of SENTENCES) of a family's tiny model."""
    config_name, tokenizer_name, _ = FAMILIES[family]
    tokenizer = request.getfixturevalue(tokenizer_name)
    return request.getfixturevalue(config_name), tokenizer, dict(tokenizer(SENTENCES, padding=True,
                                                                            return_tensors="pt"))


def classifier(config, pooling: str):
    """A seeded random classifier of `config` in eval mode: the family's own [CLS] head, or the mean-pooled one.

    Initialised 10x wider than transformers' default (std 0.02 gives logits ~1e-2, which a removed head moves by
    ~1e-5: float noise), so that every head visibly matters and a wrong cut cannot pass as rounding.
    """
    config = copy.deepcopy(config)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    if pooling == "cls":
        return AutoModelForSequenceClassification.from_config(config).eval()
    return mean_pool_class(config.model_type)(config).eval()


def some_keep_mask(layers: int, heads: int) -> torch.Tensor:
    """bool [layers, heads]: two heads gone from the first layer, one from the last."""
    keep = torch.ones(layers, heads, dtype=torch.bool)
    keep[0, [0, 2]] = False
    keep[-1, 1] = False
    return keep


@torch.no_grad()
def masked_logits(model, batch, keep: torch.Tensor) -> torch.Tensor:
    """The unpruned model's logits [B, C] with the removed heads' context zeroed (the reference for pruning)."""
    with head_gates(model, lambda layer, b, heads: keep[layer].float().expand(b, heads)):
        return model(**batch).logits


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model(**batch).logits


def heads_parameters(config) -> int:
    """Parameters of one head: Q, K, V rows (head_size x hidden) and biases, and its output-projection columns."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    size = hidden // heads
    return 3 * (size * hidden + size) + hidden * size


# --- classifiers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classifier_forward_and_padding_does_not_change_a_sentence(request, family, pooling):
    config, tokenizer, batch = family_parts(request, family)
    model = classifier(config, pooling)
    out = logits(model, batch)
    assert out.shape == (len(SENTENCES), 2) and torch.isfinite(out).all()
    alone = logits(model, dict(tokenizer(SENTENCES[-1:], return_tensors="pt")))  # the shortest, unpadded
    assert torch.allclose(alone, out[-1:], atol=1e-6)


def test_mean_pooled_distilbert_reads_the_masked_mean_through_one_linear(tiny_distilbert_config,
                                                                        tiny_distilbert_tokenizer):
    model = classifier(tiny_distilbert_config, "mean")
    assert model.pre_classifier is None and isinstance(model.classifier, torch.nn.Linear)
    assert count_parameters(model) == count_parameters(classifier(tiny_distilbert_config, "cls")) - 32 * 32 - 32
    batch = dict(tiny_distilbert_tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        hidden = model.distilbert(**batch).last_hidden_state  # [B, T, H]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = model.classifier((hidden * mask).sum(1) / mask.sum(1))
    assert torch.allclose(logits(model, batch), expected, atol=1e-6)
    # a BERT tokenizer's token_type_ids are dropped, not passed into DistilBERT's attention
    assert torch.equal(logits(model, batch | {"token_type_ids": torch.zeros_like(batch["input_ids"])}),
                       logits(model, batch))


# --- head pruning --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pruned_equals_masked_with_exact_parameter_accounting(request, family, pooling):
    config, _, batch = family_parts(request, family)
    model = classifier(config, pooling)
    keep = some_keep_mask(config.num_hidden_layers, config.num_attention_heads)
    reference = masked_logits(model, batch, keep)
    assert (reference - logits(model, batch)).abs().max() > 1e-4  # removing these heads matters
    pruned = prune_heads_(copy.deepcopy(model), keep)
    torch.testing.assert_close(logits(pruned, batch), reference, rtol=1e-4, atol=1e-6)
    assert count_parameters(model) - count_parameters(pruned) == int((~keep).sum()) * heads_parameters(config)
    assert kept_heads(pruned) == [row.nonzero().flatten().tolist() for row in keep]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pruned_model_round_trips_through_save_and_load(request, family, pooling, tmp_path):
    config, tokenizer, batch = family_parts(request, family)
    pruned = prune_heads_(classifier(config, pooling), some_keep_mask(config.num_hidden_layers,
                                                                      config.num_attention_heads))
    save_classifier(pruned, tokenizer, tmp_path)
    loaded, _ = load_classifier(tmp_path)
    assert type(loaded) is type(pruned)
    assert kept_heads(loaded) == kept_heads(pruned)
    assert count_parameters(loaded) == count_parameters(pruned)
    assert torch.equal(logits(loaded, batch), logits(pruned, batch))


def test_head_importance_scores_every_head(request, family):
    config, _, batch = family_parts(request, family)
    scores = head_importance(classifier(config, "mean"), [batch | {"labels": torch.tensor([1, 0, 1, 0])}])
    assert scores.shape == (config.num_hidden_layers, config.num_attention_heads)
    assert torch.allclose(scores.norm(dim=1), torch.ones(config.num_hidden_layers), atol=1e-5)


@st.composite
def mpnet_keep_masks(draw, layers: int = 2, heads: int = 4):
    """Any bool [layers, heads] mask keeping at least one head per layer."""
    row = st.lists(st.booleans(), min_size=heads, max_size=heads).filter(any)
    return torch.tensor(draw(st.lists(row, min_size=layers, max_size=layers)))


@settings(max_examples=25, deadline=None)
@given(keep=mpnet_keep_masks())
def test_mpnet_pruned_equals_masked_for_any_mask(tiny_mpnet_config, tiny_mpnet_tokenizer, keep):
    """Each pruned layer adds only its kept heads' slice of the encoder-wide relative-position bias."""
    batch = dict(tiny_mpnet_tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    model = classifier(tiny_mpnet_config, "mean")
    pruned = prune_heads_(copy.deepcopy(model), keep)
    torch.testing.assert_close(logits(pruned, batch), masked_logits(model, batch, keep), rtol=1e-4, atol=1e-6)


def test_mpnet_pruned_twice_reads_the_bias_of_the_heads_it_still_has(tiny_mpnet_config, tiny_mpnet_tokenizer):
    batch = dict(tiny_mpnet_tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    model = classifier(tiny_mpnet_config, "mean")
    first = torch.tensor([[True, True, False, True], [True, True, True, True]])
    second = torch.tensor([[False, True, False, True], [True, False, True, True]])
    twice = prune_heads_(prune_heads_(copy.deepcopy(model), first), second)
    torch.testing.assert_close(logits(twice, batch), masked_logits(model, batch, second), rtol=1e-4, atol=1e-6)


# --- 8-bit ---------------------------------------------------------------------------------------------------


def check_quantized_round_trip(model, tokenizer, batch, backend: str, folder):
    """`model` quantized by `backend` ("int8", "bnb8") gives logits close to fp32's (so a pruned MPNet's bias
    slicing survived ONNX export), and the same after save/load; returns the loaded model."""
    fp32 = logits(model, batch)
    q = quantize(copy.deepcopy(model), Int8Config() if backend == "int8" else Bnb8Config())
    out = logits(q, batch)
    assert (out - fp32).abs().max() < 0.05 * fp32.abs().max() + 1e-3
    save_quantized(q, tokenizer, folder)
    loaded, _ = load_model(folder)
    assert torch.allclose(logits(loaded, batch), out, atol=1e-6)
    assert torch.equal(logits(loaded, batch).argmax(-1), out.argmax(-1))
    return loaded


@pytest.mark.parametrize("backend", ["int8", "bnb8"])
def test_quantized_pruned_model_round_trips(request, family, backend, tmp_path):
    config, tokenizer, batch = family_parts(request, family)
    model = prune_heads_(classifier(config, "mean"), some_keep_mask(config.num_hidden_layers,
                                                                     config.num_attention_heads))
    check_quantized_round_trip(model, tokenizer, batch, backend, tmp_path)


# --- cutting a student ---------------------------------------------------------------------------------------


def test_make_student_keeps_the_mapped_layers_with_their_weights(request, family):
    config, _, batch = family_parts(request, family)
    teacher = classifier(config, "mean")
    layers = config.num_hidden_layers
    student = make_student(teacher, layers - 1)
    assert student.config.num_hidden_layers == layers - 1
    assert teacher.config.num_hidden_layers == layers  # the teacher is left alone
    stack = "transformer.layer" if family == "distilbert" else "encoder.layer"
    t_layers = teacher.base_model.get_submodule(stack)
    s_layers = student.base_model.get_submodule(stack)
    assert len(s_layers) == layers - 1
    for s_index, t_index in enumerate(layer_map(layers, layers - 1)):
        for (name, s_param), t_param in zip(s_layers[s_index].named_parameters(),
                                            t_layers[t_index].parameters()):
            assert torch.equal(s_param, t_param), name
    assert logits(student, batch).shape == (len(SENTENCES), 2)
    # the student can be pruned in its turn
    prune_heads_(student, some_keep_mask(layers - 1, config.num_attention_heads))


# --- an unsupported family -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_albert_config():
    """ALBERT: one layer's weights shared by every layer, so no layer can be cut out or have heads removed."""
    return AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=37, num_labels=2)


@pytest.mark.parametrize(
    "stage, message",
    [
        (lambda m: mean_pool_class(m.config.model_type), "mean pooling supports"),
        (lambda m: make_student(m, 1), f"cutting a student from the teacher supports {SUPPORTED} models"),
        (lambda m: prune_heads_(m, torch.ones(2, 4, dtype=torch.bool)), f"head pruning supports {SUPPORTED} models"),
        (lambda m: head_importance(m, []), f"head pruning supports {SUPPORTED} models"),
    ],
    ids=["mean-pooling", "student", "prune", "importance"],
)
def test_an_unsupported_family_is_a_one_line_value_error_naming_the_supported(tiny_albert_config, stage, message):
    model = AutoModelForSequenceClassification.from_config(tiny_albert_config)
    with pytest.raises(ValueError, match=message) as err:
        stage(model)
    text = str(err.value)
    assert "\n" not in text and "'albert'" in text
    assert all(name in text for name in ("bert", "roberta", "mpnet", "distilbert")), text


def test_a_base_config_can_be_checked_before_training(tiny_albert_config, tiny_distilbert_config):
    assert layout_for(tiny_distilbert_config.model_type, "compress run").layers == "transformer.layer"
    with pytest.raises(ValueError, match=f"compress run supports {SUPPORTED} models, this one is 'albert'"):
        layout_for(tiny_albert_config.model_type, "compress run")


def test_an_unsupported_model_without_a_config_is_named():
    with pytest.raises(ValueError, match=f"head pruning supports {SUPPORTED} models, this one is Sequential"):
        prune_heads_(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.ones(1, 1, dtype=torch.bool))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_cli_refuses_an_unsupported_family_in_one_line(capsys, monkeypatch, tmp_path, sst2_dir, tiny_tokenizer,
                                                       tiny_albert_config, pooling):
    """`compress run` on an ALBERT base: exit 2, one line naming the supported families, before any training."""
    from compression import cli, pipeline

    base = tmp_path / "albert"
    AutoModelForSequenceClassification.from_config(tiny_albert_config).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    capsys.readouterr()  # save_pretrained's progress bar is not the command's output

    def build_here(profile, base, data, cache_root, device, threads=None, progress=pipeline.no_progress,
                   teacher_model=None):
        return pipeline.build_variants(profile, base, data, cache_root, device, progress)  # no build process

    def no_training(*args, **kwargs):
        raise AssertionError("an unsupported family must be refused before any training")

    monkeypatch.setattr(pipeline, "build_then_load", build_here)
    monkeypatch.setattr(pipeline, "finetune", no_training)
    out = tmp_path / "out"
    args = ["run", "--profile", "smoke", "--base", str(base), "--pooling", pooling, "--data", str(sst2_dir),
            "--out", str(out), "--cache", str(tmp_path / "cache")]
    assert cli.main(args) == cli.EXIT_ERROR
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("compress run: error: ") and "'albert'" in lines[0]
    assert all(name in lines[0] for name in ("bert", "roberta", "mpnet", "distilbert"))
    assert not out.exists()


# --- the whole job, per family ---------------------------------------------------------------------------------




def test_build_variants_for_each_family(request, family, tmp_path):
    from compression.pipeline import build_variants

    config, _, _ = family_parts(request, family)
    base = request.getfixturevalue(FAMILIES[family][2])
    write_tsv(tmp_path / "sst2" / "train.tsv", make_sentences(96, seed=1))
    write_tsv(tmp_path / "sst2" / "dev.tsv", make_sentences(32, seed=2))
    built = build_variants(tiny_profile(), str(base), str(tmp_path / "sst2"), tmp_path / "cache")
    by_name = {v.name: v for v in built.variants}
    assert list(by_name) == NAMES
    assert by_name["teacher"].model.config.model_type == family
    assert by_name["student"].model.config.num_hidden_layers == 2
    params = {name: v.parameters for name, v in by_name.items()}
    assert params["student"] - params["pruned_student"] == 4 * heads_parameters(config)  # tiny_profile removes 4
    assert kept_heads(by_name["pruned_student"].model) == kept_heads(by_name["pruned_student_bnb8"].model)
    # then half of the student's 2 x 37 FFN neurons (an up-projection row and bias, a down-projection column
    # each), and the embedding rows of the tokens no training sentence uses (make_sentences leaves 6 words out)
    slim = by_name["slim_student"]
    cut_tokens = by_name["pruned_student"].model.config.vocab_size - slim.model.config.vocab_size
    assert cut_tokens >= (6 if family != "roberta" else 1)  # (a byte-level BPE keeps its alphabet)
    # then the kept V x H table factored at the tiny profile's rank 8
    v, h = slim.model.config.vocab_size, config.hidden_size
    assert params["pruned_student"] - params["slim_student"] == (37 * (2 * h + 1) + cut_tokens * h
                                                                 + v * h - 8 * (v + h))
    kept = "a charming very funny film"
    assert (slim.tokenizer.tokenize(kept) == by_name["pruned_student"].tokenizer.tokenize(kept)
            == by_name["slim_student_int8"].tokenizer.tokenize(kept))
    assert kept_neurons(by_name["slim_student"].model) == kept_neurons(by_name["slim_student_bnb8"].model)


@pytest.mark.slow
def test_compress_run_smoke_for_each_family(request, family, tmp_path, capfd):
    """`compress run --profile smoke --base DIR` end to end (CLI, build process, cache, measurement, results.json)
    for a tiny random folder of each family, made 4 layers deep so that the smoke profile's 3-layer cut fits. Its
    stdout, the build process's included (captured at the file descriptors), is the table alone."""
    import copy

    from compression import cli
    from compression.schema import read_results

    config, tokenizer, _ = family_parts(request, family)
    config = copy.deepcopy(config)
    setattr(config, "n_layers" if family == "distilbert" else "num_hidden_layers", 4)
    base = tmp_path / family
    AutoModelForSequenceClassification.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    write_tsv(tmp_path / "sst2" / "train.tsv", make_sentences(96, seed=1))
    write_tsv(tmp_path / "sst2" / "dev.tsv", make_sentences(32, seed=2))
    out = tmp_path / "out"
    capfd.readouterr()  # save_pretrained's progress bar is not the command's output
    code = cli.main(["run", "--profile", "smoke", "--base", str(base), "--data", str(tmp_path / "sst2"),
                     "--out", str(out), "--cache", str(tmp_path / "cache")])
    printed = capfd.readouterr()
    assert code == 0, printed.err[-2000:]
    table = printed.out.splitlines()
    assert len(table) == 2 + len(NAMES) and all(line.startswith("|") for line in table), printed.out[:2000]
    assert "fine-tuning the teacher" in printed.err  # the progress lines
    results = read_results(out / "results.json")
    assert [v.name for v in results.variants] == NAMES
    assert results.variants[3].parameters < results.variants[0].parameters  # the cut student is smaller
