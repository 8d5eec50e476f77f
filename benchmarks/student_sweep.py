"""Choose the student's distillation recipe on whole sentences held out of train (never on validation).

    python -m benchmarks.student_sweep --teacher ~/.cache/model-compression/teacher-XXXX \\
        --alpha 0.5 1.0 --lr 8e-5 --epochs 2 --augment 0 8 --out /tmp/sweep
    python -m benchmarks.student_sweep --teacher /tmp/teachers/mean-batch32-lr5e-05-epochs5 --cut 3 \\
        --batch-size 128 --lr 2e-4 4e-4 --epochs 1 --polish 20000 --polish-prune-only --polish-lr 1e-4 --out /tmp/sweep

Holds out `--holdout` whole sentences of train and every phrase of them (`teacher_sweep.leak_free_split`),
distils the student base (default: the embedded MiniLM-L6) from the teacher's logits on the remaining rows for
each soft-target weight, temperature, learning rate and augmentation, and prints the held-out accuracy at
every epoch's end and the table of finished runs. `--augment N` adds N teacher-labelled copies of each whole
training sentence with words swapped for their embedding-table neighbours (`compression.augment`). `--cut N`
makes the student the teacher cut to N layers, as the `minilm` profile's is (`distill.make_student`); its teacher
must then be one that never saw the held-out sentences (`teacher_sweep.py --save`), as the student starts from
its weights. `--batch-size` sets the distillation's and the polish passes' batch size.

`--polish N [N ...]` then continues each finished student on N seeded rows for one epoch at `--polish-lr`, as
the pruning stages' recovery does: rows of train alone (`--polish-from train`, the pipeline's default) or of the
student's own rows, augmented sentences included (`--polish-from student`); `--polish-prune` also removes the
profile's share of heads before that pass (the pruned student's stage) and `--polish-prune-only` skips the uncut
pass. It tells what the pruned student's gain or loss against its parent comes from, and which recovery to use.

The teacher's logits over train and over the augmented sentences are computed once into `--out` and reused by
later sweeps. `--augmented-cache` instead takes the augmented sentences and logits a `compress run` cached (its
`augmented-*` folder; grown from all of train) and keeps those grown from the sentences this split trains on: no
teacher forward at all. The teacher was fine-tuned on all of train, held-out sentences included, so its logits on
the remaining rows may carry a trace of them; the student never sees a held-out sentence or its logits.
`--save DIR` keeps each finished student (before any polish) for later experiments; `--load DIR` polishes such a
student instead of training one.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import datasets
import torch
from safetensors.torch import load_file, save_file

from benchmarks.teacher_sweep import HeldOutEachEpoch, leak_free_split
from compression.artifacts import load_classifier, save_classifier
from compression.augment import AugmentConfig, augmented_sentences, augmented_with_sources, sentence_rows
from compression.bases import MINILM, resolve_base
from compression.data import batches, load_sst2, tokenize
from compression.distill import (DistillConfig, distill, make_student, teacher_outputs, with_feature_rows,
                                 with_teacher_logits)
from compression.measure import accuracy, predict
from compression.models import load_base
from compression.prune import PruneConfig, head_importance, keep_mask_from_scores, prune_heads_
from compression.train import TrainConfig, bf16_supported, training_rows


def cached_teacher(path: Path, teacher_dir: str, sentences: list[str], batch_size: int, what: str = "logits"
                   ) -> torch.Tensor:
    """The teacher's `what` over `sentences`: "logits" [N, 2] or "pooled" vectors [N, H] (`teacher_outputs`), from
    `path` when it holds them, else computed and saved there."""
    if path.exists():
        saved = load_file(path)[what]
        if len(saved) == len(sentences):
            return saved
    teacher, tokenizer = load_classifier(teacher_dir)
    ds = tokenize(sentence_rows(sentences), tokenizer)
    start = time.perf_counter()
    logits, pooled = teacher_outputs(teacher, ds, tokenizer, batch_size, bf16=bf16_supported(True),
                                     features=what == "pooled")
    out = {"logits": logits, "pooled": pooled}[what]
    print(f"teacher {what} over {len(sentences):,} sentences: {time.perf_counter() - start:.0f} s", flush=True)
    tmp = path.with_suffix(".tmp")
    save_file({what: out}, tmp)
    tmp.replace(path)
    return out


def reused_augmented(folder: Path, full_sentences: list[str], kept_rows: list[int], table: torch.Tensor,
                     vocab: dict[str, int], config: AugmentConfig) -> tuple[list[str], torch.Tensor]:
    """(sentences, [N, 2] logits) of a `compress run` augmented cache entry grown from all of train
    (`full_sentences`), keeping only those grown from `kept_rows`. Regrows the sentences with their sources to
    prove the entry was made this way (same words table, config and rows); exits with a one-line error if not."""
    cached = json.loads((folder / "sentences.json").read_text())
    logits = load_file(folder / "logits.safetensors")["logits"]
    grown = augmented_with_sources(full_sentences, table, vocab, config)
    if [new for _, new in grown] != cached or len(cached) != len(logits):
        sys.exit(f"--augmented-cache {folder}: its sentences are not {config.copies} copies grown from all of train "
                 "with this student's word table and seed")
    keep = set(kept_rows)
    chosen = [n for n, (source, _) in enumerate(grown) if source in keep]
    return [cached[n] for n in chosen], logits[torch.tensor(chosen, dtype=torch.long)]


def polish(student, train_s, rows_by_source: dict, held_s, tokenizer, distill_config: DistillConfig, lr: float,
           sizes: list[int], seed: int, label: str, prune: bool, uncut: bool = True,
           features: torch.Tensor | None = None, batch_size: int = 32) -> None:
    """Print held-out accuracy of copies of `student` continued for one epoch on each of `sizes` seeded rows of
    each of `rows_by_source` ({name: rows}): as it is (when `uncut`) and (when `prune`) with the pipeline's share
    of heads removed first, scored on rows of train (`train_s`) as the pipeline scores them. `features`: the
    teacher's pooled vectors the rows' feature_row indexes, for a recipe with the feature term."""
    cuts = ([("polish", False)] if uncut else []) + ([("prune + polish", True)] if prune else [])
    for (name, cut), (source, rows), n in itertools.product(cuts, rows_by_source.items(), sizes):
        config = TrainConfig(learning_rate=lr, epochs=1.0, max_rows=n, batch_size=batch_size, seed=seed)
        model = copy.deepcopy(student)
        if cut:
            prune_config = PruneConfig()
            scoring = training_rows(train_s, TrainConfig(max_rows=prune_config.batch_size
                                                         * prune_config.importance_batches, seed=config.seed))
            scores = head_importance(model, batches(scoring, tokenizer, prune_config.batch_size, with_labels=True))
            prune_heads_(model, keep_mask_from_scores(scores, prune_config.remove))
            acc = accuracy(predict(model, held_s, tokenizer), held_s["labels"])
            print(f"{label} {name}: held-out accuracy {acc:.2f}% after the cut", flush=True)
        start = time.perf_counter()
        distill(None, model, tokenizer, training_rows(rows, config), distill_config, config, features=features)
        acc = accuracy(predict(model, held_s, tokenizer), held_s["labels"])
        print(f"{label} {name} ({n:,} rows of {source}, lr {lr:g}): held-out accuracy "
              f"{acc:.2f}% ({time.perf_counter() - start:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the fine-tuned teacher's folder (a cache entry)")
    parser.add_argument("--student", default=MINILM, help="student base (default: the embedded MiniLM-L6)")
    parser.add_argument("--cut", type=int, help="instead of a base, the student is the teacher cut to this many "
                        "layers (the minilm profile's student); give a teacher that never saw the held-out "
                        "sentences (teacher_sweep.py --save)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32], help="training batch size(s); the "
                        "polish passes use the same")
    parser.add_argument("--data", default=None, help="SST-2 folder (default: $SST2_DIR, else the hub)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the teacher's logits, reused")
    parser.add_argument("--train-logits", type=Path, help="the teacher's logits over all of train, in train's "
                        "order (a cached teacher_logits-*/logits.safetensors of `compress run`); else computed")
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5])
    parser.add_argument("--temperature", type=float, nargs="+", default=[2.0])
    parser.add_argument("--lr", type=float, nargs="+", default=[8e-5])
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--augment", type=int, nargs="+", default=[0], help="copies per whole sentence (0: none)")
    parser.add_argument("--feature-weight", type=float, nargs="+", default=[0.0], help="weight of the pooled-vector "
                        "term (cosine distance to the teacher's mean-pooled last layer; 0: logits alone)")
    parser.add_argument("--holdout", type=int, default=2000, help="whole train sentences held out for choosing")
    parser.add_argument("--min-words", type=int, default=10, help="shortest row held out, in words")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--polish", type=int, nargs="+", default=[], help="rows each finished student continues "
                        "on for one epoch, one pass per figure (none: no polish)")
    parser.add_argument("--polish-from", nargs="+", choices=["train", "student"], default=["train"],
                        help="the polish's rows: train alone, or the student's own (augmented sentences included)")
    parser.add_argument("--polish-lr", type=float, default=5e-5)
    parser.add_argument("--polish-prune", action="store_true", help="also remove heads before the polish")
    parser.add_argument("--polish-prune-only", action="store_true", help="only the pass with heads removed")
    parser.add_argument("--augmented-cache", type=Path, help="a `compress run` augmented-* cache folder (grown "
                        "from all of train with --augment copies) to take the augmented sentences and logits from")
    parser.add_argument("--save", type=Path, help="folder to keep each finished student in (one subfolder each)")
    parser.add_argument("--load", type=Path, help="a student saved by --save (same split, student base and "
                        "recipe) to polish instead of training one; needs one recipe")
    args = parser.parse_args()
    if args.load and not (args.load / "config.json").is_file():
        parser.error(f"--load {args.load}: no saved student there (config.json missing)")
    if args.load and len(list(itertools.product(args.augment, args.alpha, args.temperature, args.lr,
                                                 args.feature_weight))) != 1:
        parser.error("--load takes the one recipe its student was trained with: give one value per option")
    if args.augmented_cache and not (args.augmented_cache / "sentences.json").is_file():
        parser.error(f"--augmented-cache {args.augmented_cache}: no sentences.json there")
    if args.augmented_cache and len(set(args.augment) - {0}) != 1:
        parser.error("--augmented-cache serves one --augment figure: the copies it was grown with")
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)

    sst2 = load_sst2(args.data)
    full = sst2.splits["train"]
    split = leak_free_split(full.add_column("row", list(range(len(full)))), args.holdout, args.min_words, args.seed)
    train, held = split["train"], split["test"].remove_columns("row")
    print(f"held out {len(held)} sentences; training on {len(train)} rows", flush=True)
    if args.train_logits:
        logits = load_file(args.train_logits)["logits"][torch.tensor(train["row"])]
    else:
        name = f"{Path(args.teacher).name}-train-{args.holdout}-{args.seed}.safetensors"
        logits = cached_teacher(args.out / name, args.teacher, train["sentence"], 128)
    train_rows = train["row"]
    train = train.remove_columns("row")

    if args.cut:
        base, s_tokenizer = load_classifier(args.teacher)
        base = make_student(base, args.cut)
    else:
        torch.manual_seed(args.seed)  # the new head's initialisation, the same for every recipe
        base, s_tokenizer = load_base(resolve_base(args.student), pooling="mean")
    held_s = tokenize(held, s_tokenizer)
    train_s = with_teacher_logits(tokenize(train, s_tokenizer), logits)
    table = base.get_input_embeddings().weight.detach()  # the swaps' neighbours: the student's own word pieces
    with_copies = {0: train_s}
    texts = {0: []}  # each row set's augmented sentences, after train's (the order of its pooled vectors)
    for copies in sorted(set(args.augment) - {0}):
        config = AugmentConfig(copies=copies, seed=args.seed)
        if args.augmented_cache:
            new, new_logits = reused_augmented(args.augmented_cache, full["sentence"], train_rows, table,
                                               s_tokenizer.get_vocab(), config)
        else:
            new = augmented_sentences(train["sentence"], table, s_tokenizer.get_vocab(), config)
            name = f"{Path(args.teacher).name}-augment-{copies}-{args.holdout}-{args.seed}.safetensors"
            new_logits = cached_teacher(args.out / name, args.teacher, new, 128)
        extra = tokenize(sentence_rows(new, new_logits.argmax(-1).tolist()), s_tokenizer)
        extra = with_teacher_logits(extra, new_logits).cast(train_s.features)
        with_copies[copies] = datasets.concatenate_datasets([train_s, extra])
        texts[copies] = new
        print(f"augment {copies}: {len(new):,} new sentences", flush=True)
    features = {}
    if any(w > 0 for w in args.feature_weight):  # the teacher's pooled vectors: train's rows, then each set's copies
        name = f"{Path(args.teacher).name}-pooled-train-{args.holdout}-{args.seed}.safetensors"
        pooled_train = cached_teacher(args.out / name, args.teacher, train["sentence"], 128, "pooled")
        for copies in with_copies:
            name = f"{Path(args.teacher).name}-pooled-augment-{copies}-{args.holdout}-{args.seed}.safetensors"
            extra = (cached_teacher(args.out / name, args.teacher, texts[copies], 128, "pooled")
                     if texts[copies] else None)
            features[copies] = pooled_train if extra is None else torch.cat([pooled_train, extra])
            with_copies[copies] = with_feature_rows(with_copies[copies])
    rows = []
    for copies, alpha, temperature, batch_size, lr, weight in itertools.product(
            args.augment, args.alpha, args.temperature, args.batch_size, args.lr, args.feature_weight):
        rows_s = with_copies[copies]
        label = (f"augment={copies} alpha={alpha:g} T={temperature:g} batch={batch_size} lr={lr:g} "
                 f"epochs={args.epochs:g}{f' features={weight:g}' if weight else ''}")
        train_config = TrainConfig(learning_rate=lr, epochs=args.epochs, batch_size=batch_size, seed=args.seed)
        start = time.perf_counter()
        if args.load:  # a student this recipe trained before (--save): only the polish passes run
            student, _ = load_classifier(str(args.load))
            label = f"{label} (loaded from {args.load})"
        else:
            student = copy.deepcopy(base)
            distill(None, student, s_tokenizer, rows_s,
                    DistillConfig(temperature=temperature, alpha=alpha, feature_weight=weight), train_config,
                    callbacks=[HeldOutEachEpoch(held_s, s_tokenizer, label)], features=features.get(copies))
        seconds = time.perf_counter() - start
        acc = accuracy(predict(student, held_s, s_tokenizer), held_s["labels"])
        rows.append((copies, alpha, temperature, batch_size, lr, weight, len(rows_s), acc, seconds))
        print(f"{label}: held-out accuracy {acc:.2f}% ({seconds:.0f} s)", flush=True)
        if args.save and not args.load:
            folder = args.save / (f"augment{copies}-alpha{alpha:g}-T{temperature:g}-batch{batch_size}-lr{lr:g}"
                                  f"-epochs{args.epochs:g}{f'-features{weight:g}' if weight else ''}")
            save_classifier(student, s_tokenizer, folder)
            print(f"saved to {folder}", flush=True)
        if args.polish:
            sources = {"train": with_copies[0], "student": rows_s}  # with their feature rows when there are any
            polish(student, train_s, {k: sources[k] for k in args.polish_from}, held_s, s_tokenizer,
                   DistillConfig(temperature=temperature, alpha=alpha, feature_weight=weight), args.polish_lr,
                   args.polish, args.seed, label, args.polish_prune or args.polish_prune_only,
                   uncut=not args.polish_prune_only, features=features.get(copies), batch_size=batch_size)
    print("\n| augment copies | alpha | T | batch | lr | feature weight | epochs | rows | held-out acc (%) "
          "| train time (s) |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for copies, alpha, temperature, batch_size, lr, weight, n, acc, seconds in sorted(rows, key=lambda r: -r[7]):
        print(f"| {copies} | {alpha:g} | {temperature:g} | {batch_size} | {lr:g} | {weight:g} | {args.epochs:g} | "
              f"{n:,} | {acc:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
