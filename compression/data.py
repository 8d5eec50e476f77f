"""SST-2 loading, validation and tokenization.

The local layout is GLUE's: ``train.tsv`` and ``dev.tsv``, a header line ``sentence<TAB>label`` and labels in
{0, 1}. Files are checked line by line before they reach ``datasets`` so that a bad file fails with one message
naming the file, the line and the column, instead of a parser traceback deep inside pandas or arrow.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv"}
COLUMNS = ("sentence", "label")
DATA_ENV = "SST2_DIR"


class DataError(ValueError):
    """A data file or folder that cannot be used; the message names it."""


@dataclass(frozen=True)
class SST2:
    """The two splits plus a fingerprint of their content (part of every cache key)."""

    splits: datasets.DatasetDict  # columns: sentence (str), label (int 0/1)
    checksum: str  # sha256 over the files read, or the hub dataset's fingerprint
    source: str  # the folder read, or the hub id


def read_tsv(path: Path) -> dict[str, list]:
    """Parse and validate one GLUE SST-2 file. Raises DataError naming the file, line and column."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a file (expected GLUE SST-2 layout: "
                        f"{', '.join(SPLIT_FILES.values())})")
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected GLUE SST-2 layout: {', '.join(SPLIT_FILES.values())})")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8 (at byte {err.start})") from None
    # Split on "\n" only: str.splitlines() would also split on a "\r" inside a field (the local train.tsv
    # ends every sentence with one) and on Unicode separators that can occur in text.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: empty file (expected a header line 'sentence<TAB>label')")
    header = [h.strip() for h in lines[0].removeprefix("\ufeff").split("\t")]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column {missing[0]!r} (header is {header})")
    s_col, l_col = header.index("sentence"), header.index("label")
    sentences: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) != len(header):
            raise DataError(f"{path}:{number}: expected {len(header)} tab-separated fields, found {len(fields)}")
        label = fields[l_col].strip()
        if label not in ("0", "1"):
            raise DataError(f"{path}:{number}: column 'label' is {label!r}, expected 0 or 1")
        sentences.append(fields[s_col])
        labels.append(int(label))
    if not sentences:
        raise DataError(f"{path}: no data rows after the header")
    return {"sentence": sentences, "label": labels}


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The local folder to read: the argument, else $SST2_DIR, else None (meaning: GLUE from the hub)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: no such data folder (expected {', '.join(SPLIT_FILES.values())} inside)")
    return path


def load_sst2(data_dir: str | os.PathLike | None = None) -> SST2:
    """SST-2 from a local GLUE-layout folder (argument or $SST2_DIR), else GLUE SST-2 from the hub."""
    folder = resolve_data_dir(data_dir)
    if folder is None:
        log.info("no local SST-2 folder given: loading nyu-mll/glue sst2 from the hub")
        try:
            hub = datasets.load_dataset("nyu-mll/glue", "sst2")
        except OSError as err:  # ConnectionError offline; the datasets cache unwritable; a broken download
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(f"no SST-2 folder given (--data DIR, or ${DATA_ENV}), and GLUE SST-2 (nyu-mll/glue) "
                            f"cannot be had from the hub: {why}") from None
        splits = datasets.DatasetDict({k: hub[k].select_columns(list(COLUMNS)) for k in SPLIT_FILES})
        return SST2(splits, "hub:" + hub["train"]._fingerprint + hub["validation"]._fingerprint, "nyu-mll/glue")
    digest = hashlib.sha256()
    columns = {}
    for split, name in SPLIT_FILES.items():
        path = folder / name
        columns[split] = read_tsv(path)
        digest.update(path.read_bytes())
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    splits = datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(cols, features=features) for split, cols in columns.items()}
    )
    log.info("SST-2 from %s: %s", folder, {k: len(v) for k, v in splits.items()})
    return SST2(splits, digest.hexdigest(), str(folder))


def tokenize(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = 128) -> datasets.Dataset:
    """Add input_ids / attention_mask (/ token_type_ids) and `length`; unpadded, padding happens per batch."""

    def encode(batch: dict) -> dict:
        enc = tokenizer(batch["sentence"], truncation=True, max_length=max_length)
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    out = ds.map(encode, batched=True, remove_columns=["sentence"], desc="tokenizing")
    return out.rename_column("label", "labels")


def collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorWithPadding:
    """Pads each batch to its own longest sentence."""
    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def batches(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    by_length: bool = True,
    with_labels: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Padded model-input batches of a tokenized split, in dataset order unless `by_length`.

    With `by_length` the rows are sorted by length so that padding is minimal; each batch then carries
    `index` [B] (the rows' positions in `ds`) so predictions can be put back in order. `with_labels` adds
    `labels` [B] for a loss.
    """
    lengths = ds["length"]
    order = sorted(range(len(ds)), key=lengths.__getitem__) if by_length else list(range(len(ds)))
    keep = [c for c in MODEL_INPUTS + (("labels",) if with_labels else ()) if c in ds.column_names]
    pad = collator(tokenizer)
    rows = ds.select_columns(keep)
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pad([rows[i] for i in idx])
        batch["index"] = torch.tensor(idx)
        out.append(dict(batch))
    return out
