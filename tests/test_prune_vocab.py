"""Vocabulary pruning: choosing the ids, embedding surgery, the renumbered tokenizer, save/load, int8, bnb8 and
export of a pruned model, for each family's tiny model (BERT, RoBERTa, MPNet, DistilBERT)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast

from compression.artifacts import load_classifier, load_model, save_classifier, save_quantized
from compression.export import export_variant, max_length, predict_texts, text_logits
from compression.models import count_parameters
from compression.prune import kept_heads, prune_heads_
from compression.prune_vocab import (
    KEPT_TOKENS_KEY,
    ORIGINAL_VOCAB_KEY,
    VocabPruneConfig,
    complete_keep_ids,
    kept_token_ids,
    prune_to_corpus_,
    prune_vocabulary_,
    pruned_tokenizer,
)
from compression.quantize import Bnb8Config, Int8Config, quantize
from conftest import FAMILY_FIXTURES, tiny_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDPIECE = ("bert", "mpnet", "distilbert")
TRAIN = ["a good movie .", "not very funny , too slow", "the acting is brilliant !", "dull , weak script"]
# TRAIN's words in other sentences, each at the start of one or not as in TRAIN (a BPE spells them differently)
KEPT_ONLY = ["a good movie , too slow", "not very funny !", "the acting is weak"]
UNSEEN = "the boring movie"  # "boring" is in every tiny vocabulary, not in TRAIN


@pytest.fixture(params=list(FAMILY_FIXTURES))
def family(request) -> str:
    return request.param


def train_keep_ids(tokenizer) -> torch.Tensor:
    rows = tokenizer(TRAIN, add_special_tokens=False)["input_ids"]
    return complete_keep_ids(tokenizer, kept_token_ids(rows, tokenizer.all_special_ids, len(tokenizer)))


def pruned_pair(model, tokenizer):
    """(pruned copy of model, its tokenizer), pruned to TRAIN's tokens."""
    keep = train_keep_ids(tokenizer)
    pruned = copy.deepcopy(model)
    prune_vocabulary_(pruned, keep)
    return pruned, pruned_tokenizer(tokenizer, keep)


@torch.no_grad()
def logits(model, tokenizer, sentences) -> torch.Tensor:
    return model(**tokenizer(sentences, padding=True, return_tensors="pt")).logits


def hidden_size(config) -> int:
    return config.dim if config.model_type == "distilbert" else config.hidden_size


# --- the pruned model and tokenizer ----------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_identical_logits_on_sentences_whose_tokens_are_all_kept(request, family, pooling):
    model, tokenizer = tiny_classifier(request, family, pooling)
    pruned, new_tokenizer = pruned_pair(model, tokenizer)
    keep = set(train_keep_ids(tokenizer).tolist())
    assert all(i in keep for ids in tokenizer(KEPT_ONLY)["input_ids"] for i in ids)
    for sentences in (TRAIN, KEPT_ONLY):
        expected = logits(model, tokenizer, sentences)
        assert (expected[0] - expected[1]).abs().max() > 1e-3  # the sentences tell apart
        assert torch.equal(logits(pruned, new_tokenizer, sentences), expected)
        # the same tokens, renumbered
        assert [new_tokenizer.convert_ids_to_tokens(ids) for ids in new_tokenizer(sentences)["input_ids"]] == \
               [tokenizer.convert_ids_to_tokens(ids) for ids in tokenizer(sentences)["input_ids"]]


def test_parameters_fall_by_the_removed_rows_exactly(request, family):
    model, tokenizer = tiny_classifier(request, family)
    keep = train_keep_ids(tokenizer)
    pruned = copy.deepcopy(model)
    prune_vocabulary_(pruned, keep)
    vocab, kept = model.config.vocab_size, len(keep)
    assert kept < vocab
    assert count_parameters(model) - count_parameters(pruned) == (vocab - kept) * hidden_size(model.config)
    assert pruned.get_input_embeddings().weight.shape == (kept, hidden_size(model.config))
    assert pruned.config.vocab_size == getattr(pruned.config, KEPT_TOKENS_KEY) == kept
    assert getattr(pruned.config, ORIGINAL_VOCAB_KEY) == vocab
    assert torch.equal(pruned.get_input_embeddings().weight, model.get_input_embeddings().weight[keep])


def test_special_ids_are_renumbered_consistently(request, family):
    model, tokenizer = tiny_classifier(request, family)
    pruned, new_tokenizer = pruned_pair(model, tokenizer)
    assert len(new_tokenizer) == pruned.config.vocab_size
    assert isinstance(new_tokenizer, PreTrainedTokenizerFast)
    assert new_tokenizer.all_special_tokens == tokenizer.all_special_tokens
    assert new_tokenizer.model_input_names == tokenizer.model_input_names
    assert pruned.config.pad_token_id == new_tokenizer.pad_token_id == tokenizer.pad_token_id  # kept its id
    assert pruned.get_input_embeddings().padding_idx == new_tokenizer.pad_token_id
    for key, token in (("bos_token_id", tokenizer.bos_token), ("eos_token_id", tokenizer.eos_token)):
        if getattr(model.config, key, None) is not None:
            assert getattr(pruned.config, key) == new_tokenizer.convert_tokens_to_ids(token)
    ids = new_tokenizer("a good movie")["input_ids"]  # [CLS]/<s> ... [SEP]/</s> from the post-processor
    assert (ids[0], ids[-1]) == (new_tokenizer.cls_token_id, new_tokenizer.sep_token_id)
    padded = new_tokenizer(["a", "a good movie"], padding=True)["input_ids"]
    assert padded[0][-1] == new_tokenizer.pad_token_id
    assert new_tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "agoodmovie"


@pytest.mark.parametrize("family", WORDPIECE)
def test_an_unkept_word_is_unk_in_its_place(request, family):
    """A tiny WordPiece vocabulary has whole words only, so an unkept word has no kept pieces: [UNK]. The pruned
    model then reads exactly what the original reads with [UNK] at that position."""
    model, tokenizer = tiny_classifier(request, family)
    pruned, new_tokenizer = pruned_pair(model, tokenizer)
    before, after = tokenizer(UNSEEN)["input_ids"], new_tokenizer(UNSEEN)["input_ids"]
    position = tokenizer.convert_ids_to_tokens(before).index("boring")
    assert len(after) == len(before) and after[position] == new_tokenizer.unk_token_id
    with_unk = before[:position] + [tokenizer.unk_token_id] + before[position + 1:]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([with_unk])).logits
        got = pruned(input_ids=torch.tensor([after])).logits
    assert torch.equal(got, expected)


def test_an_unkept_bpe_token_is_spelled_with_kept_ones(request):
    """Byte-level BPE keeps its alphabet, so an unkept token is spelled by the merges that remain; the text
    decodes back unchanged."""
    model, tokenizer = tiny_classifier(request, "roberta")
    keep = train_keep_ids(tokenizer)
    new_tokenizer = pruned_tokenizer(tokenizer, keep)
    assert "\u0120boring" in tokenizer.convert_ids_to_tokens(tokenizer(UNSEEN)["input_ids"])
    ids = new_tokenizer(UNSEEN)["input_ids"]
    assert "\u0120boring" not in new_tokenizer.convert_ids_to_tokens(ids)
    assert new_tokenizer.unk_token_id not in ids
    assert new_tokenizer.decode(ids, skip_special_tokens=True) == UNSEEN


def test_bpe_keep_ids_gain_the_alphabet_and_the_merges_that_build_kept_tokens(tiny_roberta_tokenizer):
    rows = tiny_roberta_tokenizer(TRAIN, add_special_tokens=False)["input_ids"]
    used = kept_token_ids(rows, tiny_roberta_tokenizer.all_special_ids, len(tiny_roberta_tokenizer))
    complete = complete_keep_ids(tiny_roberta_tokenizer, used)
    assert set(used.tolist()) < set(complete.tolist())
    assert torch.equal(complete_keep_ids(tiny_roberta_tokenizer, complete), complete)  # a fixed point
    with pytest.raises(ValueError, match=r"BPE merges .* need \d+ more ids .*complete_keep_ids"):
        pruned_tokenizer(tiny_roberta_tokenizer, used)


def test_wordpiece_keep_ids_need_nothing_more(tiny_tokenizer):
    keep = torch.tensor([0, 1, 2, 3, 4, 9])
    assert torch.equal(complete_keep_ids(tiny_tokenizer, keep), keep)


def test_pruning_twice_equals_pruning_once(request, family):
    model, tokenizer = tiny_classifier(request, family)
    first = train_keep_ids(tokenizer)
    once_model, twice_model = copy.deepcopy(model), copy.deepcopy(model)
    prune_vocabulary_(twice_model, first)
    first_tokenizer = pruned_tokenizer(tokenizer, first)
    # second round: the first round's ids of KEPT_ONLY's tokens (a subset of TRAIN's)
    rows = first_tokenizer(KEPT_ONLY, add_special_tokens=False)["input_ids"]
    second = complete_keep_ids(first_tokenizer,
                               kept_token_ids(rows, first_tokenizer.all_special_ids, len(first_tokenizer)))
    prune_vocabulary_(twice_model, second)
    twice_tokenizer = pruned_tokenizer(first_tokenizer, second)
    prune_vocabulary_(once_model, first[second])
    once_tokenizer = pruned_tokenizer(tokenizer, first[second])
    twice = logits(twice_model, twice_tokenizer, KEPT_ONLY)
    assert torch.equal(twice, logits(once_model, once_tokenizer, KEPT_ONLY))
    assert torch.equal(twice, logits(model, tokenizer, KEPT_ONLY))
    assert getattr(twice_model.config, ORIGINAL_VOCAB_KEY) == model.config.vocab_size
    assert getattr(twice_model.config, KEPT_TOKENS_KEY) == len(second)


def test_prune_to_corpus_keeps_what_the_sentences_use(request, family, caplog):
    model, tokenizer = tiny_classifier(request, family)
    with caplog.at_level("INFO", logger="compression.prune_vocab"):
        new_tokenizer = prune_to_corpus_(model, tokenizer, TRAIN)
    assert model.config.vocab_size == len(new_tokenizer) == len(train_keep_ids(tokenizer))
    assert f"keeping {len(new_tokenizer)} of {len(tokenizer)} tokens" in caplog.text
    counted = copy.deepcopy(tiny_classifier(request, family)[0])
    assert len(prune_to_corpus_(counted, tokenizer, TRAIN, VocabPruneConfig(min_count=2))) < len(new_tokenizer)


# --- choosing the ids: properties --------------------------------------------------------------------------------


@st.composite
def rows_and_specials(draw):
    vocab = draw(st.integers(1, 40))
    ids = st.integers(0, vocab - 1)
    rows = draw(st.lists(st.lists(ids, max_size=12), max_size=8))
    specials = draw(st.lists(ids, max_size=5))
    return rows, specials, vocab, draw(st.integers(1, 3))


@settings(max_examples=200, deadline=None)
@given(case=rows_and_specials())
def test_kept_token_ids_properties(case):
    rows, specials, vocab, min_count = case
    used = [i for row in rows for i in row]
    expected = set(specials) | {i for i in used if used.count(i) >= min_count}  # specials, and ids seen enough
    if not expected:
        with pytest.raises(ValueError, match="no token ids to keep"):
            kept_token_ids(rows, specials, vocab, min_count)
        return
    keep = kept_token_ids(rows, specials, vocab, min_count)
    ids = keep.tolist()
    assert keep.dtype == torch.long and keep.dim() == 1
    assert ids == sorted(set(ids))  # sorted, unique
    assert set(specials) <= set(ids) <= set(used) | set(specials)
    assert all(0 <= i < vocab for i in ids)
    assert set(ids) == expected


def test_kept_token_ids_example():
    keep = kept_token_ids([[7, 5, 7], [], [9]], special_ids=[0, 1], vocab_size=10)
    assert keep.tolist() == [0, 1, 5, 7, 9]
    assert kept_token_ids([[7, 5, 7], [9]], [0, 1], 10, min_count=2).tolist() == [0, 1, 7]


# --- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, specials, message",
    [
        ([[1, 2], [3, 10]], [0], "token id 10 in row 1 is out of range 0..9"),
        ([[], [-1]], [0], "token id -1 in row 1 is out of range 0..9"),
        ([[1]], [12], "special token id 12 is out of range 0..9"),
        ([[], []], [], "no token ids to keep"),
        ([[3]], [], "no token ids to keep"),  # with min_count 2
    ],
)
def test_kept_token_ids_refuses_bad_ids(rows, specials, message):
    with pytest.raises(ValueError, match=message):
        kept_token_ids(rows, specials, 10, min_count=2)


@pytest.mark.parametrize("min_count", [0, -1, 1.5, True])
def test_min_count_is_validated(min_count):
    with pytest.raises(ValueError, match="min_count must be a whole number >= 1"):
        VocabPruneConfig(min_count=min_count)


@pytest.mark.parametrize(
    "keep, message",
    [
        (torch.tensor([], dtype=torch.long), "keep_ids is empty"),
        (torch.tensor([0, 1, 2, 99]), "keep id 99 is out of range 0..51"),
        (torch.tensor([-1, 0, 1, 2]), "keep id -1 is out of range"),
        (torch.tensor([0, 2, 1, 3, 4]), "sorted and unique"),
        (torch.tensor([0, 1, 1, 2, 3, 4]), "sorted and unique"),
        (torch.tensor([0.0, 1.0, 2.0]), "integer ids"),
        (torch.tensor([[0, 1, 2]]), "1-D tensor"),
        ([0, 1, 2], "1-D tensor"),
    ],
)
def test_bad_keep_ids_are_refused_by_model_and_tokenizer(tiny_model, tiny_tokenizer, keep, message):
    with pytest.raises(ValueError, match=message):
        prune_vocabulary_(tiny_model, keep)
    with pytest.raises(ValueError, match=message):
        pruned_tokenizer(tiny_tokenizer, keep)


def test_a_special_token_not_kept_is_refused(tiny_model, tiny_tokenizer):
    keep = torch.tensor([1, 2, 3, 4, 7, 8])  # no [PAD] (0)
    with pytest.raises(ValueError, match=r"config.pad_token_id = 0 is not among the kept ids"):
        prune_vocabulary_(tiny_model, keep)
    with pytest.raises(ValueError, match=r"'\[PAD\]' \(id 0\) is not among the kept ids"):
        pruned_tokenizer(tiny_tokenizer, keep)
    assert tiny_model.config.vocab_size == len(tiny_tokenizer)  # refused before any change


def test_a_padding_token_that_would_move_is_refused(tiny_roberta_config):
    config = copy.deepcopy(tiny_roberta_config)
    config.bos_token_id = config.eos_token_id = None
    model = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(ValueError, match="padding token 1 would become 0: it must keep its id"):
        prune_vocabulary_(model, torch.tensor([1, 2, 3, 4, 5]))


def test_a_model_of_no_supported_family_is_refused():
    with pytest.raises(ValueError, match="vocabulary pruning supports bert, roberta, mpnet, distilbert models, "
                                         "this one is Sequential"):
        prune_vocabulary_(torch.nn.Sequential(torch.nn.Embedding(4, 2)), torch.tensor([0, 1]))


def test_a_unigram_tokenizer_is_refused_by_name():
    from tokenizers import Tokenizer, models

    unigram = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0)),
                                      unk_token="<unk>")
    with pytest.raises(ValueError, match="supports WordPiece and BPE tokenizers, this one is Unigram"):
        pruned_tokenizer(unigram, torch.tensor([0, 1]))


def test_a_tokenizer_without_a_tokenizers_backend_is_refused():
    class Slow:
        pass

    with pytest.raises(ValueError, match="needs a `tokenizers`-backed tokenizer, got Slow"):
        pruned_tokenizer(Slow(), torch.tensor([0]))


# --- save and load, 8-bit, export ------------------------------------------------------------------------------


@pytest.mark.parametrize("heads_too", [False, True])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pruned_model_and_tokenizer_round_trip(request, family, pooling, heads_too, tmp_path):
    model, tokenizer = tiny_classifier(request, family, pooling)
    pruned, new_tokenizer = pruned_pair(model, tokenizer)
    if heads_too:
        keep = torch.ones(pruned.config.num_hidden_layers, pruned.config.num_attention_heads, dtype=torch.bool)
        keep[0, [0, 2]] = keep[-1, 1] = False
        prune_heads_(pruned, keep)
    save_classifier(pruned, new_tokenizer, tmp_path)
    loaded, loaded_tokenizer = load_classifier(tmp_path)
    assert type(loaded) is type(pruned) and kept_heads(loaded) == kept_heads(pruned)
    assert count_parameters(loaded) == count_parameters(pruned)
    assert getattr(loaded.config, KEPT_TOKENS_KEY) == pruned.config.vocab_size
    plain = AutoTokenizer.from_pretrained(tmp_path)  # the standard class loads it
    sentences = TRAIN + KEPT_ONLY
    for t in (loaded_tokenizer, plain):
        assert t(sentences + [UNSEEN])["input_ids"] == new_tokenizer(sentences + [UNSEEN])["input_ids"]
        assert t.all_special_ids == new_tokenizer.all_special_ids
    assert torch.equal(logits(loaded, loaded_tokenizer, sentences), logits(pruned, new_tokenizer, sentences))
    if not heads_too:
        assert torch.equal(logits(loaded, loaded_tokenizer, sentences), logits(model, tokenizer, sentences))


@pytest.mark.parametrize("backend", ["int8", "bnb8"])
def test_quantized_pruned_model_agrees_with_its_fp32_and_round_trips(request, family, backend, tmp_path):
    """8-bit of the pruned model is 8-bit of the unpruned one on kept sentences (int8 quantizes each embedding row
    on its own, bnb8 leaves embeddings alone), close to its fp32, and the same after save/load."""
    model, tokenizer = tiny_classifier(request, family)
    pruned, new_tokenizer = pruned_pair(model, tokenizer)
    config = Int8Config(threads=1) if backend == "int8" else Bnb8Config()
    sentences = TRAIN + KEPT_ONLY
    fp32 = logits(pruned, new_tokenizer, sentences)
    out = logits(q := quantize(copy.deepcopy(pruned), config), new_tokenizer, sentences)
    assert torch.allclose(out, logits(quantize(copy.deepcopy(model), config), tokenizer, sentences), atol=1e-5)
    assert (out - fp32).abs().max() < 0.1 * fp32.abs().max() + 1e-3
    assert (fp32 - fp32.mean(0)).abs().max() > 0.2 * fp32.abs().max()  # so agreeing is not agreeing on a constant
    save_quantized(q, new_tokenizer, tmp_path)
    loaded, loaded_tokenizer = load_model(tmp_path)
    assert loaded_tokenizer(sentences)["input_ids"] == new_tokenizer(sentences)["input_ids"]
    assert torch.allclose(logits(loaded, loaded_tokenizer, sentences), out, atol=1e-6)


def test_int8_quantizes_the_pruned_embedding_per_row(request):
    import onnx

    model, tokenizer = tiny_classifier(request, "roberta")  # 77 kept rows: above quantize_embedding_rows' 16
    pruned, _ = pruned_pair(model, tokenizer)
    q = quantize(pruned, Int8Config(threads=1))
    shapes = {t.name: tuple(t.dims) for t in onnx.load_from_string(q.onnx_bytes).graph.initializer}
    table = pruned.get_input_embeddings().weight
    assert [name for name, shape in shapes.items() if name.endswith("_int8") and shape == tuple(table.shape)]


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_export_and_predict_with_the_pruned_tokenizer(request, family, tmp_path):
    model, tokenizer = tiny_classifier(request, family)
    pruned, new_tokenizer = pruned_pair(model, tokenizer)
    save_classifier(pruned, new_tokenizer, tmp_path / "fp32")
    (tmp_path / "int8").mkdir()
    save_quantized(quantize(copy.deepcopy(pruned), Int8Config(threads=1)), new_tokenizer, tmp_path / "int8")
    length = max_length(pruned.config.to_dict())
    sentences = KEPT_ONLY + [UNSEEN, " ".join(TRAIN * 12)]  # the last one longer than max_length
    for kind in ("fp32", "int8"):
        out = export_variant(tmp_path / kind, tmp_path / f"out-{kind}")
        reference, _ = load_model(tmp_path / kind)
        for got, text in zip(text_logits(out, sentences), sentences):
            enc = new_tokenizer(text, truncation=True, max_length=length, return_tensors="pt")
            with torch.no_grad():
                expected = reference(**enc).logits[0].numpy()
            np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
        assert len(predict_texts(out, sentences)) == len(sentences)


# --- the real tokenizer ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_minilm_tokenizer_on_sst2(tmp_path):
    """The embedded MiniLM's WordPiece, pruned to the tokens of the first 5,000 SST-2 training rows: every
    validation sentence whose tokens are all kept gets the same tokens, an unkept one only kept ids, and the
    saved tokenizer loads and tokenizes the same. (All 67,349 rows keep 11,576 of 30,522 tokens; the tokenizing
    takes 10-40 s, so this test reads a slice.)"""
    from compression.bases import minilm_dir
    from compression.data import read_tsv

    data = Path(os.environ.get("SST2_DIR", "../shared/data/sst2"))
    if not (data / "train.tsv").is_file():
        pytest.skip(f"no SST-2 at {data} (set SST2_DIR)")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    train, dev = read_tsv(data / "train.tsv")["sentence"][:5000], read_tsv(data / "dev.tsv")["sentence"]
    rows = tokenizer(train, add_special_tokens=False)["input_ids"]
    keep = complete_keep_ids(tokenizer, kept_token_ids(rows, tokenizer.all_special_ids, len(tokenizer)))
    new_tokenizer = pruned_tokenizer(tokenizer, keep)
    new_id = {old: new for new, old in enumerate(keep.tolist())}
    before, after = tokenizer(dev)["input_ids"], new_tokenizer(dev)["input_ids"]
    all_kept = [i for i, ids in enumerate(before) if all(t in new_id for t in ids)]
    assert 100 < len(all_kept) < len(dev)
    assert all(after[i] == [new_id[t] for t in before[i]] for i in all_kept)
    assert all(0 <= t < len(keep) for ids in after for t in ids)
    new_tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(dev)["input_ids"] == after
