"""The `compress run` job: build (or load from the cache) every variant, then measure them.

teacher -> student -> pruned student (heads removed) -> slim student (FFN neurons removed too, then its vocabulary
cut to the training sentences' tokens), each fp32, int8 and bnb8 (`compression.profiles` says how). Every trained or quantized artifact goes through the cache
(`compression.cache`), keyed by everything it depends on, so a second run loads what the first one made and a
changed setting rebuilds only what it affects. The teacher's logits over the training rows are an artifact too:
every student and recovery reads them as its soft targets.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from datasets import concatenate_datasets
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from compression import cache
from compression.artifacts import load_model, save_classifier, save_quantized
from compression.augment import augmented_sentences, sentence_rows
from compression.bases import MINILM, base_fingerprint, hub_revision, resolve_base, shown
from compression.data import SST2, batches, load_sst2, tokenize
from compression.distill import (
    distill,
    layer_map,
    make_student,
    teacher_outputs,
    with_feature_rows,
    with_teacher_logits,
)
from compression.low_rank import factorize_embeddings_, saves
from compression.measure import check_label_order
from compression.models import count_parameters, layout_for, load_base, load_finetuned
from compression.profiles import Profile, get_profile
from compression.prune import head_importance, keep_mask_from_scores, prune_heads_
from compression.prune_ffn import ffn_importance, ffn_keep_mask, prune_ffn_
from compression.prune_vocab import prune_to_corpus_
from compression.quantize import quantize
from compression.train import TrainConfig, finetune, resolve_precision, training_indices, training_rows

log = logging.getLogger(__name__)

STUDENT_TARGETS = "teacher-logits-v1"  # how students learn; part of their cache keys


def no_progress(message: str) -> None:
    """The default progress callback (module level, so it can cross into the build process)."""


@dataclass
class Variant:
    """A model of the run, where it is saved, the tokenizer it reads, and how long it took to make."""

    name: str
    model: torch.nn.Module
    folder: Path
    parameters: int
    seconds: float  # time spent making it (0 when loaded from the cache)
    tokenizer: object = None


@dataclass
class Run:
    """What `build_variants` returns: the variants in table order, plus the data they share."""

    variants: list[Variant]
    sst2: SST2
    profile: Profile
    stages: dict[str, float]
    hub_teacher: str | None = None  # `org/name@<commit>` where the base or given teacher came from the hub


def _build_stages(profile, base, data, cache_root, device, threads, progress, teacher_model=None) -> dict[str, float]:
    if threads:
        torch.set_num_threads(threads)
    return build_variants(profile, base, data, cache_root, device, progress, teacher_model).stages


def build_then_load(
    profile: Profile,
    base: str | None = None,
    data: str | None = None,
    cache_root: Path | None = None,
    device: str = "cpu",
    threads: int | None = None,
    progress: Callable[[str], None] = no_progress,
    teacher_model: str | None = None,
) -> Run:
    """`build_variants` in a fresh process, then again here, where everything now loads from the cache.

    Why: in the process that trained and exported the models, int8 latencies measured up to 1.6x slower than
    in one that only loaded them (thread pools and allocations left behind), which made CPU latency ratios
    depend on whether the cache was warm. Figures are therefore always taken in a process that only loads.
    `progress` must be picklable (a module-level function).
    """
    from compression.worker import run_in_child

    stages = run_in_child(_build_stages, profile, base, data, cache_root, device, threads, progress, teacher_model)
    built = build_variants(profile, base, data, cache_root, device, teacher_model=teacher_model)
    built.stages = stages
    for v in built.variants:
        v.seconds = stages[v.name]
    return built


def _timed_cached(root, stage, key, build, load, stages):
    start = time.perf_counter()
    out = cache.cached(root, stage, key, build, load)
    stages[stage] = round(time.perf_counter() - start, 1)
    return out


def _rows(n: int, config) -> list[int]:
    index = training_indices(n, config)
    return list(range(n)) if index is None else index


def _digest(index: list[int]) -> str:
    return hashlib.sha256(np.asarray(index, dtype=np.int64).tobytes()).hexdigest()[:16]


def build_variants(
    profile: Profile,
    base: str | None = None,
    data: str | None = None,
    cache_root: Path | None = None,
    device: str = "cpu",
    progress: Callable[[str], None] = no_progress,
    teacher_model: str | None = None,
) -> Run:
    """Train (or load from the cache) the four fp32 models, then make their int8 and bnb8 variants (and, on a
    GPU, their int8 weight-only wo8 variants).

    `base` replaces the profile's teacher base; `teacher_model` (a fine-tuned two-label classifier: folder or hub
    id) is used as the teacher as it is, with no fine-tuning.
    """
    if base is not None and teacher_model is not None:
        raise ValueError("--base and --teacher exclude each other: --teacher is already fine-tuned")
    root = Path(cache_root).absolute() if cache_root else cache.default_root()  # results.json names folders under it
    use_cpu = not str(device).startswith("cuda")  # train where the models run, even where a GPU is idle
    profile = replace(profile, **{stage: resolve_precision(getattr(profile, stage), use_cpu)
                                  for stage in ("teacher", "student", "recovery", "low_rank_recovery")})
    sst2 = load_sst2(data)
    train = sst2.splits["train"]
    stages: dict[str, float] = {}
    teacher_name = resolve_base(teacher_model or base or profile.teacher_base, root)
    # resolved once: a hub id's is a request to the hub each time
    student_name = None if profile.student_base is None else resolve_base(profile.student_base, root)
    torch.manual_seed(profile.teacher.seed)  # the new classifier head's initialisation is part of the recipe
    if teacher_model is None:
        base_model, tokenizer = load_base(teacher_name, pooling=profile.pooling, cache_root=root)
    else:
        base_model, tokenizer = load_finetuned(teacher_name)
    # Every stage a family must support is checked here, before hours of training (one-line errors).
    if profile.student_base is None:
        student_type = base_model.config.model_type
        layout_for(student_type, "cutting a student from the teacher", type(base_model).__name__)
        try:  # checked where the student is cut too, but only after the teacher has trained
            layer_map(base_model.config.num_hidden_layers, profile.distill.num_layers)
        except ValueError as err:
            raise ValueError(f"{shown(teacher_name)}: {err}") from None
    else:
        student_config = AutoConfig.from_pretrained(student_name, local_files_only=True, trust_remote_code=False)
        student_type = student_config.model_type
    layout_for(student_type, "head pruning")
    train_t = tokenize(train, tokenizer, profile.teacher.max_length)

    def load_fp32(folder: Path):
        model, _ = load_model(folder, device)
        return model.eval()

    # teacher: fine-tuned here, or given
    # Every later key chains from this one, so it names all they depend on that it is not given: the data (the
    # logits' rows, the students' sentences) and the pooling (a student base's head), a given teacher's too.
    identity = {"data": sst2.checksum, "pooling": profile.pooling}
    if teacher_model is None:
        identity["base"] = base_fingerprint(teacher_name)
        teacher_key = cache.cache_key({**identity, "stage": "teacher", "train": profile.teacher})
    else:  # used as it is: only the tokenization its logits are computed at matters of the teacher's recipe
        identity["given"] = base_fingerprint(teacher_name)
        teacher_key = cache.cache_key({**identity, "stage": "teacher", "max_length": profile.teacher.max_length})

    def build_teacher(folder: Path):
        if teacher_model is not None:
            progress(f"checking the given teacher {shown(teacher_name)} on validation")
            validation = tokenize(sst2.splits["validation"], tokenizer, profile.teacher.max_length)
            check_label_order(base_model, validation, tokenizer, shown(teacher_name))
        else:
            rows = training_indices(len(train_t), profile.teacher)
            progress(f"fine-tuning the teacher ({shown(teacher_name)}, {len(rows or train_t):,} rows)")
            finetune(base_model, tokenizer, train_t if rows is None else train_t.select(rows), profile.teacher,
                     use_cpu=use_cpu)
        save_classifier(base_model, tokenizer, folder)

    teacher = _timed_cached(root, "teacher", teacher_key, build_teacher, load_fp32, stages)
    del base_model

    # the teacher's logits over every row a student or a recovery trains on
    student_rows = _rows(len(train), profile.student)
    recovery_rows = _rows(len(train), profile.recovery) if profile.recovery_from == "train" else []
    low_rank_rows = _rows(len(train), profile.low_rank_recovery) if profile.low_rank is not None else []
    needed = sorted(set(student_rows) | set(recovery_rows) | set(low_rank_rows))
    # With the feature term the same forward also keeps the teacher's pooled vectors ("pooled" beside "logits");
    # named in the keys only then, so the logits cached without them stay valid.
    want_features = profile.distill.feature_weight > 0
    with_pooled = {"pooled": True} if want_features else {}
    logits_key = cache.cache_key(
        {"from": teacher_key, "stage": "teacher_logits", "rows": _digest(needed), "bf16": profile.teacher.bf16,
         "batch_size": profile.logits_batch_size, **with_pooled}
    )

    def build_logits(folder: Path):
        what = "logits and pooled vectors" if want_features else "logits"
        progress(f"computing the teacher's {what} over {len(needed):,} training rows")
        outputs = teacher_outputs(teacher, train_t.select(needed), tokenizer, profile.logits_batch_size,
                                  profile.teacher.bf16, features=want_features)
        tensors = {}
        for name, part in zip(("logits", "pooled"), outputs):
            if part is not None:  # rows no stage reads stay NaN
                tensors[name] = torch.full((len(train), part.shape[1]), float("nan"))
                tensors[name][torch.tensor(needed)] = part
        save_file(tensors, folder / "logits.safetensors")

    outputs = _timed_cached(root, "teacher_logits", logits_key, build_logits,
                            lambda folder: load_file(folder / "logits.safetensors"), stages)
    logits = outputs["logits"]  # [len(train), C]
    pooled_rows = [outputs["pooled"]] if want_features else []  # [len(train), H], then the augmented sentences'

    def soft_rows(ds, index: list[int]):
        rows = with_teacher_logits(ds.select(index), logits[torch.tensor(index)])
        return with_feature_rows(rows, index) if want_features else rows  # train's row i: pooled vector i

    # student: cut from the teacher (same tokenizer), or its own base (its own tokenizer)
    if profile.student_base is None:
        s_tokenizer, train_s, s_identity = tokenizer, train_t, {"cut": profile.distill.num_layers}
        s_max_length = profile.teacher.max_length
    else:
        torch.manual_seed(profile.student.seed)
        student_base_model, s_tokenizer = load_base(student_name, pooling=profile.pooling, cache_root=root)
        s_max_length = profile.student.max_length
        train_s = tokenize(train, s_tokenizer, s_max_length)
        s_identity = {"base": base_fingerprint(student_name)}
    # teacher-labelled copies of the student's whole training sentences, words swapped for neighbours in the
    # student's embedding table (TinyBERT-style), with the teacher's logits over them: computed once, like those
    augmented = None
    if profile.augment is not None:
        augmented_key = cache.cache_key(
            {"from": teacher_key, "stage": "augmented", "augment": profile.augment, "rows": _digest(student_rows),
             "words": s_identity, "bf16": profile.teacher.bf16, "batch_size": profile.logits_batch_size,
             **with_pooled}
        )

        def build_augmented(folder: Path):
            words_from = student_base_model if profile.student_base is not None else teacher
            sentences = augmented_sentences([train["sentence"][i] for i in student_rows],
                                            words_from.get_input_embeddings().weight.detach(), s_tokenizer.get_vocab(),
                                            profile.augment)
            progress(f"computing the teacher's {'logits and pooled vectors' if want_features else 'logits'} over "
                     f"{len(sentences):,} augmented sentences")
            rows = tokenize(sentence_rows(sentences), tokenizer, profile.teacher.max_length)
            logits, pooled = teacher_outputs(teacher, rows, tokenizer, profile.logits_batch_size, profile.teacher.bf16,
                                             features=want_features)
            save_file({"logits": logits, **({"pooled": pooled} if want_features else {})},
                      folder / "logits.safetensors")
            (folder / "sentences.json").write_text(json.dumps(sentences))

        def load_augmented(folder: Path):
            sentences = json.loads((folder / "sentences.json").read_text())
            saved = load_file(folder / "logits.safetensors")
            logits = saved["logits"]  # [N, C]
            # the teacher's choice is each new sentence's label (the labels' term of the loss)
            rows = with_teacher_logits(
                tokenize(sentence_rows(sentences, logits.argmax(-1).tolist()), s_tokenizer, s_max_length), logits
            )
            if not want_features:
                return rows, None
            # the augmented sentence j's pooled vector follows train's: row len(train) + j
            return with_feature_rows(rows, range(len(train), len(train) + len(rows))), saved["pooled"]

        augmented, augmented_pooled = _timed_cached(root, "augmented", augmented_key, build_augmented,
                                                    load_augmented, stages)
        pooled_rows += [augmented_pooled] if want_features else []
    # [len(train) + augmented, H]: the teacher's pooled vectors, indexed by the rows' feature_row (feature term)
    features = torch.cat(pooled_rows) if want_features else None

    def student_set():
        """The student's own rows: its share of train, then the augmented sentences (each with teacher logits)."""
        rows = soft_rows(train_s, student_rows)
        return rows if augmented is None else concatenate_datasets([rows, augmented.cast(rows.features)])

    # How the soft targets were computed (the teacher's precision and batch size, which moves its padding) changes
    # them slightly. Every stage that learns from them chains from the student's key, so naming the recipe there
    # keys them all; it is named only when not the defaults, so caches made before stay valid.
    recipe = {"bf16": profile.teacher.bf16, "batch_size": profile.logits_batch_size}
    default_recipe = {"bf16": TrainConfig.bf16, "batch_size": Profile.logits_batch_size}
    student_key = cache.cache_key(
        {"from": teacher_key, "stage": "student", "student": s_identity, "targets": STUDENT_TARGETS,
         "distill": profile.distill, "train": profile.student,
         **({"augmented": augmented_key} if augmented is not None else {}),
         **({"logits_recipe": recipe} if recipe != default_recipe else {})}
    )

    def build_student(folder: Path):
        torch.manual_seed(profile.student.seed)
        if profile.student_base is None:
            progress(f"distilling a {profile.distill.num_layers}-layer student cut from the teacher")
            student = make_student(teacher, profile.distill.num_layers)
        else:
            progress(f"distilling {profile.student_base} from the teacher's logits")
            student = student_base_model
        distill(None, student, s_tokenizer, student_set(), profile.distill, profile.student, features=features,
                use_cpu=use_cpu)
        save_classifier(student, s_tokenizer, folder)

    student = _timed_cached(root, "student", student_key, build_student, load_fp32, stages)

    def recovery_set():
        """The rows a pruning stage recovers on: `profile.recovery`'s seeded slice of train, or of the student's
        own rows (train's, then the augmented sentences)."""
        if profile.recovery_from == "train":
            return soft_rows(train_s, recovery_rows)
        return training_rows(student_set(), profile.recovery)

    # the pruning stages: each scores a copy of its parent on labelled training batches, cuts it, then recovers it
    # by a short distillation from the teacher's cached logits
    def scoring_batches(config):
        """`config.importance_batches` labelled batches of the first seeded training rows (config: a pruning
        config with `batch_size` and `importance_batches`)."""
        scoring_config = replace(profile.teacher, max_rows=config.batch_size * config.importance_batches)
        return batches(train_s.select(_rows(len(train_s), scoring_config)), s_tokenizer, config.batch_size,
                       with_labels=True)

    def pruning_stage(name: str, parent: torch.nn.Module, parent_key: str, identity: dict,
                      cut: Callable[[torch.nn.Module], None]) -> tuple[str, torch.nn.Module]:
        """(cache key, model) of a stage that cuts a copy of `parent` in place (`cut`) and recovers it. The key is
        the parent's, `identity` (the stage name and its config) and the recovery's."""
        key = cache.cache_key(
            {"from": parent_key, **identity, "targets": STUDENT_TARGETS, "recovery": profile.recovery,
             # named only when not the default, so the caches of profiles that recover on train stay valid
             **({"recovery_from": profile.recovery_from} if profile.recovery_from != "train" else {})}
        )

        def build(folder: Path):
            model = copy.deepcopy(parent)
            cut(model)
            progress(f"recovering the {name.replace('_', ' ')} by distillation")
            distill(None, model, s_tokenizer, recovery_set(), profile.distill, profile.recovery, features=features,
                    use_cpu=use_cpu)
            save_classifier(model, s_tokenizer, folder)

        return key, _timed_cached(root, name, key, build, load_fp32, stages)

    def cut_heads(model):
        progress("scoring and removing attention heads")
        scores = head_importance(model, scoring_batches(profile.prune))
        prune_heads_(model, keep_mask_from_scores(scores, profile.prune.remove))
        log.info("kept heads per layer: %s", model.config.kept_heads)

    def cut_neurons(model):
        progress("scoring and removing feed-forward neurons")
        scores = ffn_importance(model, scoring_batches(profile.ffn))
        prune_ffn_(model, ffn_keep_mask(scores, profile.ffn.remove, profile.ffn.min_keep))
        log.info("kept FFN neurons per layer: %s", [len(k) for k in model.config.kept_neurons])

    # pruned student: attention heads removed; slim student: the pruned student with FFN neurons removed (stage
    # "ffn_student"), then its vocabulary cut to the tokens of every training sentence (the logits of every
    # training row are unchanged) and its word embedding factored at low rank (stage "slim_student": its key
    # names the data it read)
    pruned_key, pruned = pruning_stage("pruned_student", student, student_key,
                                       {"stage": "pruned", "prune": profile.prune}, cut_heads)
    ffn_key, ffn_student = pruning_stage("ffn_student", pruned, pruned_key, {"stage": "slim", "ffn": profile.ffn},
                                         cut_neurons)
    slim_key = cache.cache_key(
        {"from": ffn_key, "stage": "vocab", "vocab": profile.vocab, "data": sst2.checksum,
         "low_rank": profile.low_rank, "targets": STUDENT_TARGETS, "recovery": profile.low_rank_recovery}
    )

    def build_slim(folder: Path):
        progress(f"cutting the vocabulary to the tokens of the {len(train):,} training sentences")
        model = copy.deepcopy(ffn_student)
        slim_tokenizer = prune_to_corpus_(model, s_tokenizer, train["sentence"], profile.vocab)
        table = model.get_input_embeddings()
        if profile.low_rank is not None and not saves(profile.low_rank.rank, *table.weight.shape):
            log.info("embedding rank %d saves nothing on a %d x %d table: left whole", profile.low_rank.rank,
                     *table.weight.shape)
        elif profile.low_rank is not None:
            progress(f"factoring the word embedding at rank {profile.low_rank.rank}")
            factorize_embeddings_(model, profile.low_rank)
            progress("recovering the slim student by distillation")
            train_v = tokenize(train, slim_tokenizer, s_max_length)  # the same tokens as train_s, renumbered
            distill(None, model, slim_tokenizer, soft_rows(train_v, low_rank_rows), profile.distill,
                    profile.low_rank_recovery, features=features, use_cpu=use_cpu)
        save_classifier(model, slim_tokenizer, folder)

    def load_slim(folder: Path):
        model, slim_tokenizer = load_model(folder, device)
        return model.eval(), slim_tokenizer

    slim, slim_tokenizer = _timed_cached(root, "slim_student", slim_key, build_slim, load_slim, stages)
    stages["slim_student"] = round(stages["slim_student"] + stages["ffn_student"], 1)  # the row's making time

    variants = []
    for name, model, key, tok in (("teacher", teacher, teacher_key, tokenizer),
                                  ("student", student, student_key, s_tokenizer),
                                  ("pruned_student", pruned, pruned_key, s_tokenizer),
                                  ("slim_student", slim, slim_key, slim_tokenizer)):
        params = count_parameters(model)
        variants.append(Variant(name, model, root / f"{name}-{key}", params, stages[name], tok))
        for suffix, config in quantized_forms(profile, device):
            qname = f"{name}_{suffix}"
            qkey = cache.cache_key({"from": key, "stage": qname, "config": config})

            def build_q(folder: Path, model=model, config=config, qname=qname, tok=tok):
                progress(f"quantizing {qname}")
                save_quantized(quantize(copy.deepcopy(model).cpu(), config), tok, folder)

            def load_q(folder: Path):
                q, _ = load_model(folder, device)
                return q

            q = _timed_cached(root, qname, qkey, build_q, load_q, stages)
            variants.append(Variant(qname, q, root / f"{qname}-{qkey}", params, stages[qname], tok))
    return Run(variants, sst2, profile, stages, hub_revision(teacher_name))


def quantized_forms(profile: Profile, device: str) -> list[tuple[str, object]]:
    """(suffix, config) of each 8-bit variant made from every fp32 model on `device`: int8 and bnb8 always; wo8,
    the second 8-bit GPU path, only on a GPU, where it is meant to run (on a CPU, int8 is the fast path)."""
    forms = [("int8", profile.int8), ("bnb8", profile.bnb8)]
    return forms + [("wo8", profile.wo8)] if str(device).startswith("cuda") else forms


def run(
    profile_name: str,
    base: str | None = None,
    data: str | None = None,
    cache_root: Path | None = None,
    device: str = "cpu",
    threads: int | None = None,
    progress: Callable[[str], None] = no_progress,
    pooling: str | None = None,
    teacher_model: str | None = None,
) -> dict:
    """The whole job; returns the results document (written out by the CLI). `pooling` overrides the profile's;
    `teacher_model` is a fine-tuned classifier used as the teacher as it is."""
    from compression.rows import environment, measure_variants
    from compression.schema import Results, parse

    profile = get_profile(profile_name)
    if pooling is not None:
        profile = replace(profile, pooling=pooling)
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    built = build_then_load(profile, base, data, cache_root, device, threads, progress, teacher_model)
    rows = measure_variants(built, progress)
    document = {
        "schema_version": 1,
        "profile": profile.name,
        # a hub id with the commit it was read at, so a results file names the revision it measured
        "base": None if teacher_model else (built.hub_teacher or base or profile.teacher_base or MINILM),
        "teacher": (built.hub_teacher or teacher_model) if teacher_model else None,
        "student_base": profile.student_base or f"{profile.distill.num_layers} layers cut from the teacher",
        "data": built.sst2.source,
        "pooling": profile.pooling,
        "environment": environment(device),
        "stages_seconds": built.stages,
        "total_seconds": round(time.perf_counter() - start, 1),
        "variants": rows,
    }
    # One row type (compression.schema.VariantRow) for what is written and what report, gate and benchmarks read.
    return parse(Results, document, "compress run").model_dump(mode="json")
