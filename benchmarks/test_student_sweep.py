"""The student sweep's reuse of a run's cached augmented sentences: only those grown from the split's training
sentences are kept (nothing grown from a held-out sentence reaches the student), with their own logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.student_sweep import reused_augmented
from compression.augment import AugmentConfig, augmented_with_sources

ROWS = ["a good film about fun", "good fun", "a bad film about love", "bad", "the good movie about love",
        "a dull film about fun"]
VOCAB = {"good": 0, "bad": 1, "film": 2, "fun": 3, "about": 4, "movie": 5, "love": 6, "dull": 7, "the": 8}
TABLE = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.0, -1.0], [0.1, 1.0], [0.6, 0.8],
                      [-0.9, -0.1], [0.3, -0.9]])
CONFIG = AugmentConfig(copies=3, replace_prob=1.0, min_words=3, seed=0)


@pytest.fixture
def cache_entry(tmp_path):
    """A folder laid out as `compress run`'s augmented-* entry, grown from all of ROWS."""
    grown = augmented_with_sources(ROWS, TABLE, VOCAB, CONFIG)
    (tmp_path / "sentences.json").write_text(json.dumps([new for _, new in grown]))
    logits = torch.arange(2 * len(grown), dtype=torch.float32).reshape(-1, 2)  # row n: [2n, 2n + 1]
    save_file({"logits": logits}, tmp_path / "logits.safetensors")
    return tmp_path, grown, logits


def test_keeps_only_sentences_grown_from_the_kept_rows_with_their_logits(cache_entry):
    folder, grown, logits = cache_entry
    kept_rows = [0, 1, 3, 5]  # rows 2 and 4 held out
    sentences, kept_logits = reused_augmented(folder, ROWS, kept_rows, TABLE, VOCAB, CONFIG)
    expected = [n for n, (source, _) in enumerate(grown) if source in kept_rows]
    assert 0 < len(expected) < len(grown)  # the held-out rows grew sentences of their own, all dropped
    assert sentences == [grown[n][1] for n in expected]
    assert torch.equal(kept_logits, logits[expected])


def test_an_entry_grown_another_way_is_refused_naming_the_folder(cache_entry):
    folder, _, _ = cache_entry
    with pytest.raises(SystemExit, match="--augmented-cache .*not 4 copies"):
        reused_augmented(folder, ROWS, [0], TABLE, VOCAB, AugmentConfig(copies=4, replace_prob=1.0, min_words=3))


def test_teacher_outputs_are_computed_once_per_file(tmp_path, tiny_mean_model_session, tiny_tokenizer, monkeypatch):
    """`cached_teacher` saves the teacher's logits or pooled vectors beside the sweep and reads them back after."""
    from benchmarks import student_sweep
    from compression.artifacts import save_classifier
    from compression.augment import sentence_rows
    from compression.data import tokenize
    from compression.distill import teacher_outputs
    from compression.train import bf16_supported
    from conftest import make_sentences

    save_classifier(tiny_mean_model_session, tiny_tokenizer, tmp_path / "teacher")
    sentences = [s for s, _ in make_sentences(10, seed=3)]
    logits = student_sweep.cached_teacher(tmp_path / "l.safetensors", str(tmp_path / "teacher"), sentences, 4)
    pooled = student_sweep.cached_teacher(tmp_path / "p.safetensors", str(tmp_path / "teacher"), sentences, 4,
                                          "pooled")
    assert logits.shape == (10, 2) and pooled.shape == (10, 32)
    ds = tokenize(sentence_rows(sentences), tiny_tokenizer)
    direct = teacher_outputs(tiny_mean_model_session, ds, tiny_tokenizer, 4, bf16=bf16_supported(True), features=True)
    assert torch.equal(logits, direct[0]) and torch.equal(pooled, direct[1])  # each file holds what it is named for
    monkeypatch.setattr(student_sweep, "teacher_outputs", lambda *a, **k: pytest.fail("computed again"))
    assert torch.equal(student_sweep.cached_teacher(tmp_path / "p.safetensors", str(tmp_path / "teacher"),
                                                    sentences, 4, "pooled"), pooled)
    with pytest.raises(pytest.fail.Exception):  # another set of sentences is not served from that file
        student_sweep.cached_teacher(tmp_path / "p.safetensors", str(tmp_path / "teacher"), sentences[:5], 4,
                                     "pooled")
