"""The whole job on tiny random models and a small synthetic SST-2 folder: twelve variants, cache reuse, and a
student of another family and vocabulary than its teacher (distilled from the cached teacher logits)."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from compression import graphs
from compression.artifacts import load_classifier, load_model, size_mb
from compression.data import tokenize
from compression.measure import accuracy, predict, predict_single
from compression.pipeline import build_variants, quantized_forms
from compression.profiles import PROFILES, Profile, get_profile
from compression.rows import measure_variants
from compression.schema import MODELS
from compression.train import bf16_supported
from conftest import NAMES, make_sentences, tiny_profile, write_tsv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]



# --- Profile --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("pooling", "max"), ("latency_examples", 0), ("warmup", -1),
                                              ("logits_batch_size", 0), ("recovery_from", "validation")])
def test_profile_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        Profile("x", **{field: value})


def test_profiles_are_named_for_their_key():
    assert {name: p.name for name, p in PROFILES.items()} == {"full": "full", "minilm": "minilm", "smoke": "smoke"}
    assert get_profile("smoke") is PROFILES["smoke"]
    with pytest.raises(ValueError, match="'nope'"):
        get_profile("nope")


def test_wo8_variants_are_made_on_a_gpu_only():
    profile = get_profile("smoke")
    cpu = [suffix for suffix, _ in quantized_forms(profile, "cpu")]
    assert cpu == ["int8", "bnb8"]
    assert quantized_forms(profile, "cuda") == [("int8", profile.int8), ("bnb8", profile.bnb8), ("wo8", profile.wo8)]
    assert [s for s, _ in quantized_forms(profile, "cuda:1")] == ["int8", "bnb8", "wo8"]


# --- the job ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_base_dir):
    """Data folder, cache folder and the first (training) build, shared: building is the slow part."""
    root = tmp_path_factory.mktemp("job")
    write_tsv(root / "sst2" / "train.tsv", make_sentences(96, seed=1))
    write_tsv(root / "sst2" / "dev.tsv", make_sentences(32, seed=2))
    args = (tiny_profile(), str(tiny_base_dir), str(root / "sst2"), root / "cache")
    return args, build_variants(*args)


def test_build_variants_makes_twelve_models(job):
    _, first = job
    assert [v.name for v in first.variants] == NAMES
    params = {v.name: v.parameters for v in first.variants}
    # 4 layers -> 2; each removed head takes 3 x (32 x 8 + 8) of Q/K/V and 8 x 32 of output.dense columns.
    assert params["student"] < params["teacher"]
    assert params["student"] - params["pruned_student"] == 4 * (3 * (32 * 8 + 8) + 8 * 32)
    # half of the 2 x 37 FFN neurons, each an up-projection row and bias (32 + 1) and a down-projection column
    # (32); then the 6 words the training sentences never use (make_sentences draws from WORDS[:-6]): 6 embedding
    # rows of 32; then the kept V x 32 table factored at rank 8 (V x 8 rows, an 8 x 32 projection)
    v = first.variants[NAMES.index("slim_student")].model.config.vocab_size
    assert params["pruned_student"] - params["slim_student"] == 37 * (2 * 32 + 1) + 6 * 32 + (v * 32 - 8 * (v + 32))
    for fp32 in ("teacher", "student", "pruned_student", "slim_student"):
        assert params[f"{fp32}_int8"] == params[f"{fp32}_bnb8"] == params[fp32]
    assert type(first.variants[0].model).__name__ == "MeanPoolBertForSequenceClassification"
    by_name = {v.name: v.model for v in first.variants}
    slim, pruned = by_name["slim_student"].config, by_name["pruned_student"].config
    assert slim.kept_heads == pruned.kept_heads  # the slim student is cut from the pruned one
    assert sum(map(len, slim.kept_neurons)) == 37 and all(slim.kept_neurons)
    assert by_name["slim_student_bnb8"].config.kept_neurons == slim.kept_neurons
    assert slim.embedding_rank == by_name["slim_student_int8"].config.embedding_rank == 8
    tokenizers = {v.name: v.tokenizer for v in first.variants}
    assert len(tokenizers["slim_student"]) == len(tokenizers["pruned_student"]) - 6 == slim.vocab_size
    assert all(len(tokenizers[f"slim_student{q}"]) == slim.vocab_size for q in ("_int8", "_bnb8"))
    def tokens(name: str, sentence: str) -> list[str]:
        return tokenizers[name].convert_ids_to_tokens(tokenizers[name](sentence)["input_ids"])

    kept, unkept = "a charming very funny film", "a charming , funny film"  # "," is one of the 6
    assert tokens("slim_student", kept) == tokens("pruned_student", kept)  # the same tokens, renumbered
    assert tokens("slim_student", unkept) == ["[CLS]", "a", "charming", "[UNK]", "funny", "film", "[SEP]"]


def test_second_build_loads_the_same_models_from_the_cache(job):
    args, first = job
    second = build_variants(*args)
    cache = args[3]
    entries = sorted(p.name for p in cache.iterdir() if p.name != ".locks")  # (.locks: the cache's lock files)
    intermediate = ("teacher_logits-", "ffn_student-")  # artifacts that are not rows
    assert [e for e in entries if not e.startswith(intermediate)] == sorted(v.folder.name for v in second.variants)
    assert sum(e.startswith(intermediate) for e in entries) == 2
    assert [v.folder for v in second.variants] == [v.folder for v in first.variants]
    for a, b in zip(first.variants, second.variants):  # what was built is what the cache gives back
        validation = tokenize(second.sst2.splits["validation"], b.tokenizer)
        assert (predict(a.model, validation, a.tokenizer) == predict(b.model, validation, b.tokenizer)).all()


def test_measure_variants_rows(job):
    _, built = job
    rows = measure_variants(built)
    assert [r["name"] for r in rows] == NAMES
    for r in rows:
        assert 0.0 <= r["val_accuracy"] <= 100.0
        assert r["size_mb"] > 0 and r["latency_ms"]["samples"] == 4
        assert r["latency_ms"]["median"] <= r["latency_ms"]["p90"]
        assert ("latency_ratio" in r) == (r["name"] != "teacher")
        # what pruning kept, per layer: heads from the pruned student on, FFN neurons on the slim student's rows
        assert ("heads_per_layer" in r) == r["name"].startswith(("pruned_student", "slim_student"))
        assert ("neurons_per_layer" in r) == r["name"].startswith("slim_student")
        assert ("tokens_kept" in r) == ("tokens_before" in r) == r["name"].startswith("slim_student")
    by_name = {r["name"]: r for r in rows}
    assert sum(by_name["pruned_student"]["heads_per_layer"]) == 2 * 4 - 4
    assert by_name["slim_student_int8"]["heads_per_layer"] == by_name["pruned_student"]["heads_per_layer"]
    assert sum(by_name["slim_student_int8"]["neurons_per_layer"]) == 37
    assert by_name["slim_student_bnb8"]["tokens_before"] - by_name["slim_student_bnb8"]["tokens_kept"] == 6
    sizes = {r["name"]: r["size_mb"] for r in rows}  # (int8 files are not smaller here: ONNX graph overhead)
    assert sizes["pruned_student"] < sizes["student"] < sizes["teacher"]
    # (the slim student's 37 x 65 fewer parameters are 0.01 MB: under the rounding of the rows' figures)
    assert size_mb(by_name["slim_student"]["folder"]) < size_mb(by_name["pruned_student"]["folder"])


def test_on_a_gpu_every_timing_goes_through_the_served_model(job, monkeypatch):
    """The GPU's serving path, run on the CPU: the device is faked, so the wrappers run their eager fallback. The
    PyTorch fp32 models are served behind graphs (and say so), bnb8 and ONNX Runtime models as they are, and the
    latency, paired ratio, tokenize + forward and throughput timings all call the served model."""
    _, built = job
    monkeypatch.setattr(graphs, "model_device", lambda m: torch.device(
        "cuda" if next(m.parameters(), None) is not None else "cpu"))
    calls = Counter()
    forward = graphs.GraphedClassifier.forward

    def counted(self, *args, **kwargs):
        calls[self.model.config.num_hidden_layers, len(kwargs["input_ids"])] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(graphs.GraphedClassifier, "forward", counted)
    rows = {r["name"]: r for r in measure_variants(built)}
    for name, row in rows.items():
        assert row["backend"].endswith("+ CUDA graphs") == (name in MODELS), name
    assert rows["student"]["backend"] == "pytorch-fp32 (cpu) + CUDA graphs"
    # batch 1 (latency, paired blocks, tokenize + forward) and the throughput's batches, for every fp32 model
    assert {layers for layers, _ in calls} == {4, 2}
    assert any(batch > 1 for _, batch in calls) and sum(calls.values()) > 4 * 3 * 4


def test_pooling_is_part_of_every_cache_key(job):
    args, mean = job
    profile, *rest = args
    cls = build_variants(dataclasses.replace(profile, pooling="cls"), *rest)
    assert type(cls.variants[0].model).__name__ == "BertForSequenceClassification"
    assert not {v.folder for v in cls.variants} & {v.folder for v in mean.variants}


def test_slim_student_has_its_own_cache_key(job):
    """A changed FFN setting rebuilds the slim student and its 8-bit variants, and nothing else."""
    args, first = job
    profile, *rest = args
    changed = build_variants(dataclasses.replace(profile, ffn=dataclasses.replace(profile.ffn, remove=0.3)), *rest)
    moved = {a.name for a, b in zip(first.variants, changed.variants) if a.folder != b.folder}
    assert moved == {"slim_student", "slim_student_int8", "slim_student_bnb8"}
    assert sum(map(len, changed.variants[NAMES.index("slim_student")].model.config.kept_neurons)) == 74 - 22


def test_the_logits_batch_size_keys_every_model_that_learns_from_the_logits(job, tmp_path):
    """The teacher's logits computed at another batch size (other padding) are other soft targets: the student
    and every stage after it are keyed apart; the teacher and its 8-bit copies are not. (Built in a cache of its
    own, so the job's holds one set of logits per teacher; folders compared by name, i.e. by key.)"""
    args, first = job
    profile, base, data, _ = args
    changed = build_variants(dataclasses.replace(profile, logits_batch_size=5), base, data, tmp_path / "cache")
    kept = {a.name for a, b in zip(first.variants, changed.variants) if a.folder.name == b.folder.name}
    assert kept == {"teacher", "teacher_int8", "teacher_bnb8"}


def test_teacher_logits_are_computed_once_for_student_and_recovery(job):
    args, _ = job
    names = [p.name for p in args[3].iterdir()]
    logits = [n for n in names if n.startswith("teacher_logits-")]
    assert len(logits) == len([n for n in names if n.startswith("teacher-")])  # one per teacher, not per student
    assert all((args[3] / n / "logits.safetensors").is_file() for n in logits)


def test_augmented_sentences_join_the_students_rows_only(job, monkeypatch):
    """Teacher-labelled augmented sentences: built and cached once, added to the student's rows (not to the
    recoveries'), part of the student's key and so of everything after it, never of the teacher's."""
    import json

    from safetensors.torch import load_file

    from compression import pipeline
    from compression.augment import AugmentConfig

    args, first = job
    profile, *rest = args
    seen = []
    real = pipeline.distill
    monkeypatch.setattr(pipeline, "distill", lambda *a, **k: (seen.append(len(a[3])), real(*a, **k))[1])
    augmented = dataclasses.replace(profile, augment=AugmentConfig(copies=2, min_words=2))
    built = build_variants(augmented, *rest)
    (entry,) = [p for p in rest[2].iterdir() if p.name.startswith("augmented-")]
    sentences = json.loads((entry / "sentences.json").read_text())
    assert len(sentences) > 0 and load_file(entry / "logits.safetensors")["logits"].shape == (len(sentences), 2)
    assert seen[0] == profile.student.max_rows + len(sentences)  # the student's rows, then the augmented ones
    assert all(n == profile.recovery.max_rows for n in seen[1:])  # recoveries read train alone
    moved = {a.name for a, b in zip(first.variants, built.variants) if a.folder != b.folder}
    assert moved == set(NAMES) - {"teacher", "teacher_int8", "teacher_bnb8"}
    seen.clear()
    build_variants(augmented, *rest)  # everything from the cache: nothing trains again
    assert seen == []


def test_recovery_from_the_students_rows_draws_augmented_sentences_too(job, monkeypatch):
    """`recovery_from="student"`: both pruning stages recover on the student's own rows (train's share, then the
    augmented sentences, with their teacher logits); the student is the same cache entry, every stage after it
    gets a key of its own."""
    import json

    from safetensors.torch import load_file

    from compression import pipeline
    from compression.augment import AugmentConfig

    args, _ = job
    profile, *rest = args
    augmented = dataclasses.replace(profile, augment=AugmentConfig(copies=2, min_words=2))
    before = build_variants(augmented, *rest)  # cached by the test above, or built here
    (entry,) = [p for p in rest[2].iterdir() if p.name.startswith("augmented-")]
    new_sentences = json.loads((entry / "sentences.json").read_text())
    new_logits = load_file(entry / "logits.safetensors")["logits"]
    seen = []
    real = pipeline.distill
    monkeypatch.setattr(pipeline, "distill", lambda *a, **k: (seen.append(a[3]), real(*a, **k))[1])
    # every row of the pool (max_rows=None), so the count tells exactly which rows the recoveries read
    recovering = dataclasses.replace(augmented, recovery_from="student",
                                     recovery=dataclasses.replace(profile.recovery, max_rows=None))
    built = build_variants(recovering, *rest)
    assert len(seen) == 3  # the head and FFN recoveries, then the slim student's low-rank recovery
    for rows in seen[:2]:
        assert len(rows) == profile.student.max_rows + len(new_sentences)
        soft = torch.tensor(rows["teacher_logits"])
        assert torch.isfinite(soft).all()
        assert torch.allclose(soft[-len(new_sentences):], new_logits)  # the augmented rows, with their targets
    assert len(seen[2]) == profile.low_rank_recovery.max_rows  # the low-rank recovery still reads train alone
    moved = {a.name for a, b in zip(before.variants, built.variants) if a.folder != b.folder}
    assert moved == {n for n in NAMES if not n.startswith(("teacher", "student"))}


def test_feature_term_reads_the_teachers_pooled_vectors_cached_with_its_logits(job, monkeypatch):
    """`distill.feature_weight` > 0: the teacher's one pass over train and over the augmented sentences also keeps
    its pooled vectors (new cache entries: those without them stay valid); the student and every recovery get
    them, each row pointing at its own sentence's vector."""
    import json

    from safetensors.torch import load_file

    from compression import pipeline
    from compression.augment import AugmentConfig
    from compression.models import masked_mean

    args, _ = job
    profile, *rest = args
    cache_root = rest[2]
    plain = dataclasses.replace(profile, augment=AugmentConfig(copies=2, min_words=2))
    before = build_variants(plain, *rest)  # cached by the tests above, or built here
    old_entries = {p.name for p in cache_root.iterdir()}
    calls = []
    real = pipeline.distill
    monkeypatch.setattr(pipeline, "distill",
                        lambda *a, **k: (calls.append((a[3], k.get("features"))), real(*a, **k))[1])
    featured = dataclasses.replace(plain, distill=dataclasses.replace(profile.distill, feature_weight=1.0))
    built = build_variants(featured, *rest)

    new_entries = {p.name for p in cache_root.iterdir()} - old_entries
    (logits_entry,) = [n for n in new_entries if n.startswith("teacher_logits-")]
    (augmented_entry,) = [n for n in new_entries if n.startswith("augmented-")]
    saved = load_file(cache_root / logits_entry / "logits.safetensors")
    same_rows = [old for old in (load_file(cache_root / n / "logits.safetensors")["logits"]
                                 for n in old_entries if n.startswith("teacher_logits-"))
                 if torch.equal(old.isnan(), saved["logits"].isnan())]
    # the entry without vectors, over the same rows, is still there, with the same logits
    assert any(torch.allclose(saved["logits"].nan_to_num(), old.nan_to_num()) for old in same_rows)
    assert torch.equal(saved["pooled"].isnan().all(1), saved["logits"].isnan().all(1))  # a vector per row read
    augmented_pooled = load_file(cache_root / augmented_entry / "logits.safetensors")["pooled"]
    sentences = json.loads((cache_root / augmented_entry / "sentences.json").read_text())
    train_sentences = [s for s, _ in make_sentences(96, seed=1)]
    texts = train_sentences + sentences  # what each feature row was read from

    by_name = {v.name: v for v in before.variants}
    teacher, tokenizer = by_name["teacher"].model, by_name["teacher"].tokenizer

    def pooled(text):
        inputs = dict(tokenizer([text], return_tensors="pt"))
        with torch.no_grad():
            hidden = teacher(**inputs, output_hidden_states=True).hidden_states[-1]
        return masked_mean(hidden, inputs["attention_mask"])[0]

    assert len(calls) == 4  # the student, the head and FFN recoveries, the slim student's low-rank recovery
    for rows, features in calls:
        assert features is not None and features.shape == (96 + len(sentences), 32)
        assert torch.equal(features[96:], augmented_pooled)
        index = rows["feature_row"]
        for i in (0, len(rows) // 2, len(rows) - 1):  # this row's vector is its own sentence's
            assert torch.allclose(features[index[i]], pooled(texts[index[i]]), atol=1e-5)
    assert sorted(calls[0][0]["feature_row"]) == sorted(pipeline._rows(96, profile.student)) + list(
        range(96, 96 + len(sentences)))  # the student: its train rows, then every augmented sentence
    moved = {a.name for a, b in zip(before.variants, built.variants) if a.folder != b.folder}
    assert moved == {n for n in NAMES if not n.startswith("teacher")}


def test_student_of_another_family_and_vocabulary(tmp_path, tiny_base_dir, tiny_mpnet_dir):
    """An MPNet teacher (its own vocabulary) distils into a BERT student that reads its own tokenization."""
    write_tsv(tmp_path / "sst2" / "train.tsv", make_sentences(96, seed=1))
    write_tsv(tmp_path / "sst2" / "dev.tsv", make_sentences(32, seed=2))
    profile = tiny_profile(teacher_base=str(tiny_mpnet_dir), student_base=str(tiny_base_dir))
    built = build_variants(profile, None, str(tmp_path / "sst2"), tmp_path / "cache")
    by_name = {v.name: v for v in built.variants}
    assert type(by_name["teacher"].model).__name__ == "MeanPoolMPNetForSequenceClassification"
    assert type(by_name["student"].model).__name__ == "MeanPoolBertForSequenceClassification"
    assert by_name["teacher"].tokenizer.get_vocab() != by_name["student"].tokenizer.get_vocab()
    assert "kept_heads" in by_name["pruned_student"].model.config.to_dict()
    rows = measure_variants(built)
    assert [r["name"] for r in rows] == NAMES
    assert all(0.0 <= r["val_accuracy"] <= 100.0 for r in rows)


# --- a given teacher ----------------------------------------------------------------------------------------


def _biased_teacher(folder, model, tokenizer, favour: int):
    """`model` with a head that always predicts class `favour`, saved as a fine-tuned classifier folder."""
    import torch

    from compression.artifacts import save_classifier

    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([1.0, -1.0] if favour == 0 else [-1.0, 1.0]))
    save_classifier(model, tokenizer, folder)
    return folder


def test_given_teacher_is_used_as_it_is(tmp_path, tiny_model, tiny_tokenizer, monkeypatch, fake_hub):
    # (given as a hub id: a folder goes the same way, as the other given-teacher tests give it)
    from compression import pipeline

    write_tsv(tmp_path / "sst2" / "train.tsv", make_sentences(96, seed=1))
    rows = make_sentences(32, seed=2)
    write_tsv(tmp_path / "sst2" / "dev.tsv", rows)
    majority = int(sum(label for _, label in rows) * 2 >= len(rows))
    fake_hub("org/given", _biased_teacher(tmp_path / "given", tiny_model, tiny_tokenizer, majority), "c" * 40)
    monkeypatch.chdir(tmp_path / "sst2")  # (no folder named like the id)

    def no_finetune(*args, **kwargs):
        raise AssertionError("a given teacher must not be fine-tuned")

    monkeypatch.setattr(pipeline, "finetune", no_finetune)
    built = build_variants(tiny_profile(), None, str(tmp_path / "sst2"), tmp_path / "cache", teacher_model="org/given")
    assert built.hub_teacher == f"org/given@{'c' * 40}"
    rows_out = measure_variants(built)
    expected = 100.0 * sum(label == majority for _, label in rows) / len(rows)
    assert rows_out[0]["name"] == "teacher" and rows_out[0]["val_accuracy"] == round(expected, 2)
    assert [r["name"] for r in rows_out] == NAMES


@pytest.mark.parametrize("given", [False, True])
def test_results_name_a_hub_teacher_by_its_id_and_commit(monkeypatch, given):
    from types import SimpleNamespace

    from compression import pipeline, rows

    revision = f"org/tiny@{'c' * 40}"
    built = pipeline.Run([], SimpleNamespace(source="sst2"), get_profile("smoke"), {}, hub_teacher=revision)
    monkeypatch.setattr(pipeline, "build_then_load", lambda *args, **kwargs: built)
    monkeypatch.setattr(rows, "measure_variants", lambda *args, **kwargs: [])
    doc = pipeline.run("smoke", None if given else "org/tiny", teacher_model="org/tiny" if given else None)
    assert (doc["base"], doc["teacher"]) == ((None, revision) if given else (revision, None))
    built.hub_teacher = None  # a folder or an embedded base: named as it was given
    doc = pipeline.run("smoke", None if given else "./tiny", teacher_model="./tiny" if given else None)
    assert (doc["base"], doc["teacher"]) == ((None, "./tiny") if given else ("./tiny", None))


def test_a_teacher_too_shallow_to_cut_is_refused_before_it_trains(tmp_path, tiny_config, tiny_tokenizer, sst2_dir,
                                                                   monkeypatch):
    import copy

    from transformers import BertForSequenceClassification

    from compression import pipeline

    config = copy.deepcopy(tiny_config)
    config.num_hidden_layers = 1  # the tiny profile cuts a 2-layer student
    BertForSequenceClassification(config).save_pretrained(tmp_path / "shallow")
    tiny_tokenizer.save_pretrained(tmp_path / "shallow")
    monkeypatch.setattr(pipeline, "finetune", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(ValueError, match="shallow: a student of 2 layers cannot come from a teacher of 1"):
        build_variants(tiny_profile(), str(tmp_path / "shallow"), str(sst2_dir), tmp_path / "cache")


@pytest.mark.parametrize("given", [False, True], ids=["base", "teacher"])
def test_a_teacher_of_another_family_is_refused_beside_a_student_base(tmp_path, tiny_tokenizer, tiny_base_dir,
                                                                       sst2_dir, monkeypatch, given):
    """With a student base of its own (the full profile) no student is cut from the teacher, and still an ALBERT
    `--base` or `--teacher` is refused, naming it and the supported families, before any training."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    from compression import pipeline

    config = AlbertConfig(vocab_size=tiny_tokenizer.vocab_size, embedding_size=16, hidden_size=32,
                          num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, num_labels=2)
    AlbertForSequenceClassification(config).save_pretrained(tmp_path / "albert")
    tiny_tokenizer.save_pretrained(tmp_path / "albert")
    monkeypatch.setattr(pipeline, "finetune", lambda *a, **k: pytest.fail("trained before the check"))
    monkeypatch.setattr(pipeline, "distill", lambda *a, **k: pytest.fail("distilled before the check"))
    folder = str(tmp_path / "albert")
    with pytest.raises(ValueError, match=r"albert: this tool supports bert, .* this one is 'albert'") as err:
        build_variants(tiny_profile(student_base=str(tiny_base_dir), pooling="cls"), None if given else folder,
                       str(sst2_dir), tmp_path / "cache", teacher_model=folder if given else None)
    assert "\n" not in str(err.value)


def test_every_stage_trains_on_the_cpu_for_a_cpu_run(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    """`--device cpu` trains on the CPU even where a GPU is: each stage says so (None would mean "on the GPU if
    there is one")."""
    from compression import train

    write_tsv(tmp_path / "sst2" / "train.tsv", make_sentences(96, seed=1))
    dev = make_sentences(32, seed=2)
    write_tsv(tmp_path / "sst2" / "dev.tsv", dev)
    given = _biased_teacher(tmp_path / "given", tiny_model, tiny_tokenizer, int(sum(y for _, y in dev) * 2 >= 32))
    asked, real = [], train.training_arguments

    def recording(config, output_dir, use_cpu=None, *rest):
        asked.append(use_cpu)
        return real(config, output_dir, use_cpu, *rest)

    monkeypatch.setattr(train, "training_arguments", recording)
    build_variants(tiny_profile(), None, str(tmp_path / "sst2"), tmp_path / "cache", "cpu", teacher_model=str(given))
    assert asked == [True] * 4  # the student, its two pruning recoveries and the low-rank recovery


def test_given_teacher_cache_follows_the_data_and_the_pooling(tmp_path, tiny_model, tiny_tokenizer, tiny_base_dir):
    """A given teacher is the same folder each time, but what is built from it is not: new training sentences
    (same row count) or another pooling rebuild every stage, none reused from the other run."""
    dev = make_sentences(32, seed=2)
    write_tsv(tmp_path / "a" / "train.tsv", make_sentences(96, seed=1))
    write_tsv(tmp_path / "b" / "train.tsv", [(s, 1 - label) for s, label in make_sentences(96, seed=7)])
    for name in "ab":
        write_tsv(tmp_path / name / "dev.tsv", dev)
    given = _biased_teacher(tmp_path / "given", tiny_model, tiny_tokenizer, int(sum(y for _, y in dev) * 2 >= 32))
    runs = {}
    for data, pooling in (("a", "mean"), ("b", "mean"), ("a", "cls")):
        profile = tiny_profile(student_base=str(tiny_base_dir), pooling=pooling)
        runs[data, pooling] = {v.name: v for v in build_variants(profile, None, str(tmp_path / data),
                                                                 tmp_path / "cache", teacher_model=str(given)).variants}
    first = runs["a", "mean"]
    for other in (runs["b", "mean"], runs["a", "cls"]):
        assert not {v.folder for v in first.values()} & {v.folder for v in other.values()}
    assert not type(runs["a", "cls"]["student"].model).__name__.startswith("MeanPool")


@pytest.mark.skipif(not bf16_supported(use_cpu=True), reason="bf16 resolves to fp32 on this CPU: one recipe")
def test_a_given_teachers_logits_precision_keys_its_students(tmp_path, tiny_model, tiny_tokenizer):
    """A given teacher's key holds no training config, so the precision its logits were computed in (bf16 or
    fp32) must key what learns from them: the students rebuild, the teacher folder is the same."""
    write_tsv(tmp_path / "sst2" / "train.tsv", make_sentences(96, seed=1))
    dev = make_sentences(32, seed=2)
    write_tsv(tmp_path / "sst2" / "dev.tsv", dev)
    given = _biased_teacher(tmp_path / "given", tiny_model, tiny_tokenizer, int(sum(y for _, y in dev) * 2 >= 32))
    runs = []
    for bf16 in (False, True):
        profile = tiny_profile()
        profile = dataclasses.replace(profile, teacher=dataclasses.replace(profile.teacher, bf16=bf16))
        runs.append({v.name: v.folder for v in build_variants(profile, None, str(tmp_path / "sst2"),
                                                                tmp_path / "cache", teacher_model=str(given)).variants})
    assert {name for name in runs[0] if runs[0][name] == runs[1][name]} == {"teacher", "teacher_int8",
                                                                            "teacher_bnb8"}


def test_given_teacher_with_swapped_labels_is_refused(tmp_path, tiny_model, tiny_tokenizer):
    write_tsv(tmp_path / "sst2" / "train.tsv", make_sentences(96, seed=1))
    rows = make_sentences(32, seed=2)
    write_tsv(tmp_path / "sst2" / "dev.tsv", rows)
    minority = int(sum(label for _, label in rows) * 2 < len(rows))
    given = _biased_teacher(tmp_path / "given", tiny_model, tiny_tokenizer, minority)
    with pytest.raises(ValueError, match="below chance: its labels are not in SST-2's order"):
        build_variants(tiny_profile(), None, str(tmp_path / "sst2"), tmp_path / "cache", teacher_model=str(given))
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("teacher-")]


def test_given_teacher_with_three_labels_is_refused(tmp_path, tiny_config, tiny_tokenizer, sst2_dir):
    import copy

    from transformers import BertForSequenceClassification

    config = copy.deepcopy(tiny_config)
    config.num_labels = 3
    BertForSequenceClassification(config).save_pretrained(tmp_path / "three")
    tiny_tokenizer.save_pretrained(tmp_path / "three")
    with pytest.raises(ValueError, match="a 3-label classifier; SST-2 needs 2"):
        build_variants(tiny_profile(), None, str(sst2_dir), tmp_path / "cache", teacher_model=str(tmp_path / "three"))


# --- the README's "From Python" block -------------------------------------------------------------------------


def readme_python_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_block_prunes_recovers_and_quantizes(tmp_path, monkeypatch, capsys, tiny_base_dir, sst2_dir):
    """The block as printed, on the tiny classifier and data (its folder, data and row count swapped in)."""
    block = readme_python_block()
    for printed, ours in (('"my-classifier/"', repr(str(tiny_base_dir))), ('"../shared/data/sst2"', repr(str(sst2_dir))),
                          ("range(2000)", "range(64)")):
        assert block.count(printed) == 1, printed
        block = block.replace(printed, ours)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md (From Python)", "exec"), scope)

    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["teacher", "pruned", "pruned_int8"], out
    printed = dict(line.split() for line in out.splitlines())
    sentences, labels = scope["val"]["sentence"], scope["val"]["label"]
    # the saved folders are the models the block measured: read back, they predict what it printed
    pruned, tokenizer = load_classifier(tmp_path / "pruned")
    assert pruned.config.kept_heads == scope["model"].config.kept_heads
    assert sum(map(len, pruned.config.kept_heads)) == 16 - 4  # 4 layers x 4 heads, a quarter cut
    int8, _ = load_model(tmp_path / "pruned_int8")
    for name, model in (("pruned", pruned), ("pruned_int8", int8)):
        assert float(printed[name]) == round(accuracy(predict_single(model, sentences, tokenizer), labels), 2)
    # recovery trained the cut model: its weights moved away from the teacher's
    teacher_q = scope["teacher"].bert.encoder.layer[0].attention.self.query.weight
    kept = [h for h in range(4) if h in pruned.config.kept_heads[0]]
    rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in kept])
    assert not torch.equal(pruned.bert.encoder.layer[0].attention.self.query.weight, teacher_q[rows])
