import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.augment import (
    AugmentConfig,
    augment,
    augment_with_sources,
    augmented_sentences,
    augmented_with_sources,
    neighbour_table,
    whole_sentences,
    word_neighbours,
)


def test_whole_sentences_are_the_rows_no_longer_row_contains():
    rows = ["a fine film", "fine film", "a fine film with heart", "dull", "an utterly dull movie", "utterly dull"]
    assert whole_sentences(rows) == [2, 4]
    assert whole_sentences(rows, min_words=5) == [2]  # "an utterly dull movie" has 4 words


def test_a_repeated_row_is_still_a_whole_sentence():
    # SST-2 holds a few exact duplicates; a row equal to another is not a proper span of it
    assert whole_sentences(["good fun", "good fun"]) == [0, 1]


def test_neighbour_table_ranks_by_cosine_and_skips_self():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, -0.2], [0.5, 0.5]])
    table = neighbour_table(emb, torch.tensor([0, 1, 2, 3]), k=2)
    assert table.tolist() == [[1, 2], [0, 2], [1, 0], [2, 0]]  # positions into the candidates, nearest first


@settings(max_examples=30, deadline=None)
@given(v=st.integers(2, 40), d=st.integers(1, 8), k=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_neighbour_table_shape_and_never_self(v, d, k, seed):
    emb = torch.randn(v, d, generator=torch.Generator().manual_seed(seed))
    table = neighbour_table(emb, torch.arange(v), k)
    assert table.shape == (v, min(k, v - 1))
    assert not (table == torch.arange(v).unsqueeze(1)).any()


def test_word_neighbours_only_whole_alphabetic_words():
    vocab = {"[CLS]": 0, "good": 1, "great": 2, "##s": 3, "bad": 4, "9": 5, "a": 6}
    emb = torch.tensor([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0], [1.0, 0.05], [-1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    out = word_neighbours(emb, vocab, {"good", "bad", "##s", "missing"}, k=1)
    assert out == {"good": ["great"], "bad": ["good"]}  # "##s", "9", "a" and "[CLS]" never appear


def test_augment_swaps_only_known_words_and_keeps_length():
    config = AugmentConfig(copies=5, replace_prob=1.0, seed=0)
    new = augment(["a good film", "plain"], {"good": ["great", "fine"]}, config)
    assert set(new) == {"a great film", "a fine film"}  # distinct, never the source; "plain" gives nothing
    assert augment(["a good film"], {"good": ["great"]}, config) == augment(["a good film"], {"good": ["great"]}, config)


@settings(max_examples=30, deadline=None)
@given(sentences=st.lists(st.text("abc ", min_size=1, max_size=20), max_size=5), copies=st.integers(1, 6),
       p=st.floats(0.05, 1.0), seed=st.integers(0, 100))
def test_augment_properties(sentences, copies, p, seed):
    neighbours = {"a": ["b"], "b": ["c", "a"]}
    new = augment(sentences, neighbours, AugmentConfig(copies=copies, replace_prob=p, seed=seed))
    assert len(new) <= copies * len(sentences)
    for source in sentences:  # no copy is its own source, or repeats another copy of it
        own = augment([source], neighbours, AugmentConfig(copies=copies, replace_prob=p, seed=seed))
        assert " ".join(source.split()) not in own and len(set(own)) == len(own)
    for sentence in new:  # every word is a source word or a neighbour: nothing invented
        assert set(sentence.split()) <= {w for s in sentences for w in s.split()} | {"a", "b", "c"}


@settings(max_examples=30, deadline=None)
@given(sentences=st.lists(st.text("abc ", min_size=1, max_size=20), max_size=6), copies=st.integers(1, 6),
       p=st.floats(0.05, 1.0), seed=st.integers(0, 100))
def test_each_new_sentence_names_the_sentence_it_grew_from(sentences, copies, p, seed):
    neighbours = {"a": ["b"], "b": ["c", "a"]}
    config = AugmentConfig(copies=copies, replace_prob=p, seed=seed)
    grown = augment_with_sources(sentences, neighbours, config)
    assert [new for _, new in grown] == augment(sentences, neighbours, config)  # the same sentences, same order
    assert [i for i, _ in grown] == sorted(i for i, _ in grown)
    for source, new in grown:  # a swap keeps the word count, and every word is its source's or a neighbour
        words, own = new.split(), sentences[source].split()
        assert len(words) == len(own)
        assert all(w == o or w in neighbours.get(o, []) for w, o in zip(words, own))


def test_augmented_sources_index_the_callers_rows_not_the_whole_sentences():
    rows = ["good fun", "a good film about fun", "good film", "bad", "a bad film about fun"]
    vocab = {"good": 0, "bad": 1, "film": 2, "fun": 3, "about": 4, "movie": 5}
    emb = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.0, -1.0], [0.1, 1.0]])
    config = AugmentConfig(copies=4, replace_prob=1.0, min_words=3, seed=1)
    grown = augmented_with_sources(rows, emb, vocab, config)
    assert [new for _, new in grown] == augmented_sentences(rows, emb, vocab, config)
    assert {i for i, _ in grown} == {1, 4}  # the two whole sentences of 3+ words, as rows of `rows`
    assert all(len(new.split()) == len(rows[i].split()) for i, new in grown)


@pytest.mark.parametrize("bad", [{"copies": 0}, {"replace_prob": 0.0}, {"replace_prob": 1.5}, {"neighbours": 0},
                                 {"min_words": 0}])
def test_config_validates(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        AugmentConfig(**bad)
