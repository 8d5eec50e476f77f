"""Saving and loading every kind of artifact: fp32 classifiers (pruned or not), int8 (ONNX), bnb8, wo8.

One folder per artifact, always with config.json and the tokenizer files:
- fp32: `model.safetensors` (`save_pretrained`); a pruned model's config lists its kept heads and FFN neurons
  and its embedding rank (a vocabulary-pruned one simply has a smaller vocab_size);
- int8: `model.onnx` and `quantization.json`;
- bnb8: `model.safetensors` of int8 codes + absmax and `quantization.json`;
- wo8: `model.safetensors` of the int8 weight-only model's state (codes, scales, float tensors) and
  `quantization.json`.
Weights are read with safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig, PreTrainedModel

from compression.low_rank import RANK_KEY, LowRankConfig, low_rank_shape_
from compression.models import check_float_model, check_model_folder, classifier_class, readable_model
from compression.prune import KEPT_HEADS_KEY, keep_mask_from_kept, prune_heads_
from compression.prune_ffn import KEPT_NEURONS_KEY, intermediate_size, neuron_mask_from_kept, prune_ffn_
from compression.quant_bnb8 import Bnb8Config, bnb8_from_state, bnb8_state
from compression.quant_onnx import Int8Config, OnnxClassifier
from compression.quant_wo8 import Wo8Config, quantize_wo8_

QUANT_FILE = "quantization.json"
ONNX_FILE = "model.onnx"
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data")
MB = 2**20  # sizes are reported in MiB, as the reference table's 418.58 MB for 109,483,778 fp32 parameters is


def size_mb(folder: str | os.PathLike) -> float:
    """Size on disk of the weight files (safetensors / ONNX) in a saved model folder, in MiB."""
    files = [p for p in Path(folder).iterdir() if p.name.endswith(WEIGHT_SUFFIXES)]
    if not files:
        raise ValueError(f"{folder}: no weight file ({', '.join(WEIGHT_SUFFIXES)}) to measure")
    return sum(p.stat().st_size for p in files) / MB


def save_classifier(model: PreTrainedModel, tokenizer, folder: str | os.PathLike) -> None:
    """Config, safetensors weights and tokenizer into `folder` (which the caller owns)."""
    # a bnb8 model's int8 codes would be saved as if they were its weights
    check_float_model(model, "save_classifier (save_quantized writes quantized models)")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _pruned(config: PretrainedConfig) -> bool:
    """Whether a saved config records removed heads or FFN neurons or a factored embedding (then its tensors are
    not the config's shapes)."""
    return any(getattr(config, key, None) is not None for key in (KEPT_HEADS_KEY, KEPT_NEURONS_KEY, RANK_KEY))


def empty_classifier(config: PretrainedConfig) -> PreTrainedModel:
    """An untrained model shaped like a saved one: its class, its heads and FFN neurons pruned and its embedding
    factored as its config records."""
    config = copy.deepcopy(config)
    heads, neurons, rank = (getattr(config, key, None) for key in (KEPT_HEADS_KEY, KEPT_NEURONS_KEY, RANK_KEY))
    for key in (KEPT_HEADS_KEY, KEPT_NEURONS_KEY, RANK_KEY):
        if hasattr(config, key):
            delattr(config, key)  # prune_heads_, prune_ffn_ and low_rank_shape_ record them again
    cls = classifier_class(config)
    model = cls.from_config(config) if cls is AutoModelForSequenceClassification else cls(config)
    if heads is not None:
        prune_heads_(model, keep_mask_from_kept(heads, config.num_attention_heads))
    if neurons is not None:
        prune_ffn_(model, neuron_mask_from_kept(neurons, intermediate_size(model)))
    if rank is not None:
        low_rank_shape_(model, LowRankConfig(rank))  # the saved weights fill it
    return model


def load_classifier(folder: str | os.PathLike) -> tuple[PreTrainedModel, "AutoTokenizer"]:
    """Load what `save_classifier` wrote, pruned and mean-pooled models included (safetensors only)."""
    folder = Path(folder)
    check_model_folder(folder)
    with readable_model(folder):
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        if not _pruned(config):
            model = classifier_class(config).from_pretrained(folder, local_files_only=True, use_safetensors=True)
            return model.eval(), tokenizer
        # A pruned model's tensors do not fit the config's shapes: build full size, cut, then load.
        model = empty_classifier(config)
        model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    return model.eval(), tokenizer


def save_quantized(model: nn.Module, tokenizer, folder: str | Path) -> None:
    """Write a quantized model (and its tokenizer) into `folder`, which the caller owns."""
    folder = Path(folder)
    if not hasattr(model, "quantization"):
        raise ValueError("save_quantized saves what compression.quantize made; this model is not quantized: use "
                         "save_classifier")
    kind, config = model.quantization
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if kind == "int8":
        (folder / ONNX_FILE).write_bytes(model.onnx_bytes)
    elif kind == "wo8":  # the codes, scales and float tensors are the module's own state
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  folder / "model.safetensors")
    else:
        save_file(bnb8_state(model), folder / "model.safetensors")
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}
    (folder / QUANT_FILE).write_text(json.dumps({"backend": kind, "config": settings}, indent=1) + "\n")


def load_model(folder: str | Path, device: str = "cpu") -> tuple[nn.Module, "AutoTokenizer"]:
    """Load any saved variant onto `device`: fp32 (pruned or not), bnb8, wo8 or int8 (ONNX Runtime, always CPU)."""
    folder = Path(folder)
    if not (folder / QUANT_FILE).is_file():
        model, tokenizer = load_classifier(folder)
        return model.to(device), tokenizer
    meta = json.loads((folder / QUANT_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    if meta["backend"] == "int8":
        int8 = Int8Config(**settings)
        model = OnnxClassifier((folder / ONNX_FILE).read_bytes(), config, int8.threads)
        model.quantization = ("int8", int8)
        return model, tokenizer
    if meta["backend"] == "bnb8":
        state = load_file(folder / "model.safetensors")
        return bnb8_from_state(empty_classifier(config), state, Bnb8Config(**settings), device), tokenizer
    if meta["backend"] == "wo8":
        # shaped like the saved model (quantizing the empty model's random weights), then filled with the saved state
        model = quantize_wo8_(empty_classifier(config), Wo8Config(**settings))
        model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
        return model.to(device), tokenizer
    raise ValueError(f"{folder / QUANT_FILE}: unknown backend {meta['backend']!r}")
