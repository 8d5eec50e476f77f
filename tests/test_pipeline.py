"""The whole job on the tiny random BERT and a small synthetic SST-2 folder: nine variants, cache reuse."""

from __future__ import annotations

import dataclasses

import pytest

from compression.distill import DistillConfig
from compression.data import tokenize
from compression.measure import predict
from compression.pipeline import PROFILES, Profile, build_variants, get_profile, measure_variants
from compression.prune import PruneConfig
from compression.train import TrainConfig
from conftest import make_sentences, write_tsv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ["teacher", "teacher_int8", "teacher_bnb8", "student", "student_int8", "student_bnb8",
         "pruned_student", "pruned_student_int8", "pruned_student_bnb8"]


def tiny_profile() -> Profile:
    train = TrainConfig(learning_rate=1e-3, epochs=1.0, batch_size=16, max_rows=64, bf16=False)
    return Profile(
        "tiny", teacher=train, distill=DistillConfig(num_layers=2), student=train,
        prune=PruneConfig(remove=4, importance_batches=2, batch_size=16), recovery=train,
        latency_examples=4, warmup=1,
    )


# --- Profile --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("pooling", "max"), ("latency_examples", 0), ("warmup", -1)])
def test_profile_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        Profile("x", **{field: value})


def test_profiles_are_named_for_their_key():
    assert {name: p.name for name, p in PROFILES.items()} == {"full": "full", "smoke": "smoke"}
    assert get_profile("smoke") is PROFILES["smoke"]
    with pytest.raises(ValueError, match="'nope'"):
        get_profile("nope")


# --- the job ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_base_dir):
    """Data folder, cache folder and the first (training) build, shared: building is the slow part."""
    root = tmp_path_factory.mktemp("job")
    write_tsv(root / "sst2" / "train.tsv", make_sentences(96, seed=1))
    write_tsv(root / "sst2" / "dev.tsv", make_sentences(32, seed=2))
    args = (tiny_profile(), str(tiny_base_dir), str(root / "sst2"), root / "cache")
    return args, build_variants(*args)


def test_build_variants_makes_nine_models(job):
    _, first = job
    assert [v.name for v in first.variants] == NAMES
    params = {v.name: v.parameters for v in first.variants}
    # 4 layers -> 2; each removed head takes 3 x (32 x 8 + 8) of Q/K/V and 8 x 32 of output.dense columns.
    assert params["student"] < params["teacher"]
    assert params["student"] - params["pruned_student"] == 4 * (3 * (32 * 8 + 8) + 8 * 32)
    for fp32 in ("teacher", "student", "pruned_student"):
        assert params[f"{fp32}_int8"] == params[f"{fp32}_bnb8"] == params[fp32]
    assert type(first.variants[0].model).__name__ == "MeanPoolBertForSequenceClassification"


def test_second_build_loads_the_same_models_from_the_cache(job):
    args, first = job
    second = build_variants(*args)
    cache = args[3]
    entries = sorted(p.name for p in cache.iterdir() if p.name != ".locks")  # (.locks: the cache's lock files)
    assert entries == sorted(v.folder.name for v in second.variants)
    assert [v.folder for v in second.variants] == [v.folder for v in first.variants]
    validation = tokenize(second.sst2.splits["validation"], second.tokenizer)
    for a, b in zip(first.variants, second.variants):  # what was built is what the cache gives back
        assert (predict(a.model, validation, second.tokenizer) == predict(b.model, validation, second.tokenizer)).all()


def test_measure_variants_rows(job):
    _, built = job
    rows = measure_variants(built)
    assert [r["name"] for r in rows] == NAMES
    for r in rows:
        assert 0.0 <= r["val_accuracy"] <= 100.0
        assert r["size_mb"] > 0 and r["latency_ms"]["samples"] == 4
        assert r["latency_ms"]["median"] <= r["latency_ms"]["p90"]
        assert ("latency_ratio" in r) == (r["name"] != "teacher")
    sizes = {r["name"]: r["size_mb"] for r in rows}  # (int8 files are not smaller here: ONNX graph overhead)
    assert sizes["pruned_student"] < sizes["student"] < sizes["teacher"]


def test_pooling_is_part_of_every_cache_key(job):
    args, mean = job
    profile, *rest = args
    cls = build_variants(dataclasses.replace(profile, pooling="cls"), *rest)
    assert type(cls.variants[0].model).__name__ == "BertForSequenceClassification"
    assert not {v.folder for v in cls.variants} & {v.folder for v in mean.variants}
