"""Choose the teacher's fine-tuning hyperparameters on a held-out part of train (never on validation).

    python benchmarks/teacher_sweep.py --data ../shared/data/sst2 --holdout 2000 --lr 5e-5 --epochs 3 5 --pooling cls mean
    python benchmarks/teacher_sweep.py --batch-size 128 --lr 1e-4 2e-4 --epochs 5 --pooling mean

Holds out `--holdout` seeded sentences of train, fine-tunes the base on the rest for each pooling, epoch count,
batch size and learning rate (in the precision `TrainConfig` resolves to here: bf16 where native), and prints the
held-out accuracy at every epoch's end and of each finished run. The winner goes into the `minilm` profile
(`compression.profiles.PROFILES`).

SST-2's train split is every phrase of the parse trees of about 6,900 sentences, so a random split leaks: most
held-out phrases are parts of, or contain, training phrases, and the held-out score rewards memorising. So the
held-out rows are whole sentences (rows of at least `--min-words` words that are no span of a longer row, like
the validation split's) and every training row that is a phrase of a held-out sentence is dropped.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import random
import time
from pathlib import Path

import datasets
import torch
from transformers import TrainerCallback

from compression.artifacts import save_classifier
from compression.augment import whole_sentences
from compression.data import load_sst2, tokenize
from compression.measure import accuracy, predict
from compression.models import POOLINGS, load_base
from compression.train import TrainConfig, finetune


def leak_free_split(train: datasets.Dataset, holdout: int, min_words: int, seed: int) -> datasets.DatasetDict:
    """`holdout` random whole sentences, and the training rows that share no parse-tree node with them.

    A whole sentence is a row that is not a word span of any longer row (the root of its parse tree). Every row
    that is a span of a held-out sentence (one of its phrases) is dropped from training.
    """
    words = [s.split() for s in train["sentence"]]
    roots = whole_sentences(train["sentence"], min_words)
    held = set(random.Random(seed).sample(roots, holdout))
    phrases = {" ".join(words[i][a:b]) for i in held for a in range(len(words[i]))
               for b in range(a + 1, len(words[i]) + 1)}
    rest = [i for i in range(len(train)) if i not in held and " ".join(words[i]) not in phrases]
    return datasets.DatasetDict({"train": train.select(rest), "test": train.select(sorted(held))})


class HeldOutEachEpoch(TrainerCallback):
    """Prints held-out accuracy at every epoch's end: the curve of one run, to see where it flattens."""

    def __init__(self, held: datasets.Dataset, tokenizer, label: str):
        self.held, self.tokenizer, self.label = held, tokenizer, label

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        acc = accuracy(predict(model, self.held, self.tokenizer), self.held["labels"])
        model.train()
        print(f"{self.label} epoch {state.epoch:.2f}: held-out accuracy {acc:.2f}%", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="SST-2 folder (default: $SST2_DIR, else the hub)")
    parser.add_argument("--base", default=None, help="base model (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--lr", type=float, nargs="+", default=[2e-5, 4e-5, 6e-5])
    parser.add_argument("--epochs", type=float, nargs="+", default=[1.0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32], help="training batch size(s)")
    parser.add_argument("--pooling", nargs="+", default=["cls"], choices=POOLINGS, help="classifier input(s)")
    parser.add_argument("--holdout", type=int, default=2000, help="whole train sentences held out for choosing")
    parser.add_argument("--min-words", type=int, default=10, help="shortest row held out, in words")
    parser.add_argument("--max-rows", type=int, default=None, help="train on at most this many rows")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--save", type=Path, help="keep each finished teacher here (one subfolder each), for "
                        "choosing the student's recipe on the same held-out sentences (student_sweep.py --cut)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    sst2 = load_sst2(args.data)
    split = leak_free_split(sst2.splits["train"], args.holdout, args.min_words, args.seed)
    print(f"held out {len(split['test'])} sentences; training on {len(split['train'])} rows", flush=True)
    rows = []
    for pooling, epochs, batch_size, lr in itertools.product(args.pooling, args.epochs, args.batch_size, args.lr):
        label = f"pooling={pooling} batch={batch_size} lr={lr:g} epochs={epochs:g}"
        config = TrainConfig(learning_rate=lr, epochs=epochs, batch_size=batch_size, max_rows=args.max_rows,
                             seed=args.seed)
        torch.manual_seed(config.seed)
        model, tokenizer = load_base(args.base, pooling=pooling)
        train = tokenize(split["train"], tokenizer, config.max_length)
        if config.max_rows:
            train = train.shuffle(seed=config.seed).select(range(min(config.max_rows, len(train))))
        held = tokenize(split["test"], tokenizer, config.max_length)
        start = time.perf_counter()
        finetune(model, tokenizer, train, config, callbacks=[HeldOutEachEpoch(held, tokenizer, label)])
        seconds = time.perf_counter() - start
        acc = accuracy(predict(model, held, tokenizer), held["labels"])
        rows.append((pooling, batch_size, lr, epochs, acc, seconds))
        print(f"{label}: held-out accuracy {acc:.2f}% ({seconds:.0f} s)", flush=True)
        if args.save:
            folder = args.save / f"{pooling}-batch{batch_size}-lr{lr:g}-epochs{epochs:g}"
            save_classifier(model, tokenizer, folder)
            print(f"saved to {folder}", flush=True)
    print("\n| pooling | batch | lr | epochs | held-out acc (%) | train time (s) |\n|:--|--:|--:|--:|--:|--:|")
    for pooling, batch_size, lr, epochs, acc, seconds in sorted(rows, key=lambda r: -r[4]):
        print(f"| {pooling} | {batch_size} | {lr:g} | {epochs:g} | {acc:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
