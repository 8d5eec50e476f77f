"""Classifiers: the mean-pooled heads, loading a base as a classifier, counting parameters.

Where a base comes from (the embedded encoders, a folder, a hub id) is `compression.bases`; saving and loading
trained or quantized artifacts is `compression.artifacts`.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    DistilBertForSequenceClassification,
    MPNetForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    RobertaForSequenceClassification,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from compression.bases import is_hub_snapshot, resolve_base, shown
from compression.schema import one_line

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean")
POOLING_KEY = "compression_pooling"  # config.json attribute naming a mean-pooled classifier


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean over real tokens: hidden [B, T, H], attention_mask [B, T] -> [B, H] (a row with none: zeros)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class _MeanPool:
    """Mixin: read the attention-masked mean of the last hidden states with one linear layer, not [CLS].

    Sentence-transformers encoders (all-MiniLM-L6-v2, all-mpnet-base-v2) were trained to be read this way; their
    [CLS] poolers never were. Any pooler is dropped, so it neither counts as a parameter nor is saved.
    """

    def _mean_pool_init(self, config: PretrainedConfig) -> None:
        encoder = getattr(self, self.base_model_prefix)
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        if not isinstance(getattr(self, "dropout", None), nn.Dropout):
            self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if not isinstance(getattr(self, "classifier", None), nn.Linear):  # MPNet's, RoBERTa's: a [CLS] head
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
            self._init_weights(self.classifier)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        """input_ids, attention_mask, token_type_ids: [B, T]; labels: [B]; returns logits [B, C]."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = getattr(self, self.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        pooled = masked_mean(out.last_hidden_state, attention_mask)  # [B, H]
        logits = self.classifier(self.dropout(pooled))  # [B, C]
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


def _marked(config: PretrainedConfig) -> PretrainedConfig:
    config = copy.deepcopy(config)  # the caller's config stays as it was
    setattr(config, POOLING_KEY, "mean")
    return config


class MeanPoolBertForSequenceClassification(_MeanPool, BertForSequenceClassification):
    """BERT (and MiniLM) read by the masked mean of its tokens."""

    def __init__(self, config: PretrainedConfig):
        super().__init__(_marked(config))
        self._mean_pool_init(self.config)


class MeanPoolMPNetForSequenceClassification(_MeanPool, MPNetForSequenceClassification):
    """MPNet (all-mpnet-base-v2) read by the masked mean of its tokens."""

    def __init__(self, config: PretrainedConfig):
        super().__init__(_marked(config))
        self._mean_pool_init(self.config)


class MeanPoolRobertaForSequenceClassification(_MeanPool, RobertaForSequenceClassification):
    """RoBERTa read by the masked mean of its tokens."""

    def __init__(self, config: PretrainedConfig):
        super().__init__(_marked(config))
        self._mean_pool_init(self.config)


class MeanPoolDistilBertForSequenceClassification(_MeanPool, DistilBertForSequenceClassification):
    """DistilBERT read by the masked mean of its tokens through one linear layer (its [CLS] head's
    `pre_classifier` is dropped, so it neither counts as a parameter nor is saved)."""

    _keys_to_ignore_on_load_unexpected = [r"^pre_classifier\."]  # a [CLS] classifier's, in a base folder

    def __init__(self, config: PretrainedConfig):
        super().__init__(_marked(config))
        self.pre_classifier = None
        self._mean_pool_init(self.config)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        """As `_MeanPool.forward`; token_type_ids (which a BERT tokenizer gives) are dropped: DistilBERT has no
        segment embeddings, and passed on they would reach its attention as an unknown keyword."""
        return super().forward(input_ids, attention_mask, None, labels, **kwargs)


MEAN_POOL_CLASSES = {
    "bert": MeanPoolBertForSequenceClassification,
    "mpnet": MeanPoolMPNetForSequenceClassification,
    "roberta": MeanPoolRobertaForSequenceClassification,
    "distilbert": MeanPoolDistilBertForSequenceClassification,
}


def check_pooling(pooling: str) -> None:
    """Raise ValueError naming `pooling` unless it is one of POOLINGS."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def classifier_class(config: PretrainedConfig) -> type:
    """The class that rebuilds a saved classifier: ours for a mean-pooled one, else the Auto class."""
    if getattr(config, POOLING_KEY, "cls") == "mean":
        return mean_pool_class(config.model_type)
    return AutoModelForSequenceClassification


def mean_pool_class(model_type: str) -> type:
    """The mean-pooled classifier for an architecture; ValueError naming the supported ones."""
    if model_type not in MEAN_POOL_CLASSES:
        raise ValueError(
            f"mean pooling supports {', '.join(MEAN_POOL_CLASSES)} models, this one is {model_type!r}; "
            "use --pooling cls"
        )
    return MEAN_POOL_CLASSES[model_type]


# The files a tokenizer is read from; a folder with none of them gets a tokenizer of special tokens alone from
# transformers (every word [UNK]), without a word of warning.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def check_model_folder(folder: str | Path) -> None:
    """ValueError naming `folder` (a local model folder) if it holds no tokenizer, if its config asks for code of
    its own (transformers would offer to run it; this tool never does), or if its `model_type` is not a family
    every stage supports (`ENCODER_LAYOUTS`; transformers knows many more)."""
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{shown(folder)}: no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # missing or malformed: transformers says so, naming the file
    if not isinstance(config, dict):
        raise ValueError(f"{shown(folder)}: its config.json is a JSON {type(config).__name__}, not an object")
    if "auto_map" in config:
        raise ValueError(f"{shown(folder)}: its config.json asks for custom code (auto_map), which is never run here")
    try:
        layout_for(config.get("model_type"), "this tool", "a config.json without a model_type")
    except ValueError as err:
        raise ValueError(f"{shown(folder)}: {err}") from None


@contextmanager
def readable_model(name: str | Path) -> Iterator[None]:
    """Reading a given model folder (config, tokenizer, weights): whatever transformers, tokenizers or safetensors
    raise about its files (a config value of the wrong type, weights of another shape, a corrupt tokenizer.json,
    truncated safetensors) as one ValueError naming `name`; errors that name it already pass as they are."""
    try:
        yield
    except SafetensorError as err:
        reason = str(err).splitlines()[0]
        raise ValueError(f"{shown(name)}: its safetensors weights cannot be read ({reason})") from None
    except torch.OutOfMemoryError:
        raise  # the machine's limit, not the folder's fault
    except Exception as err:
        if isinstance(err, ValueError) and str(err).startswith(shown(name)):
            raise
        if "ignore_mismatched_sizes" in str(err):  # transformers points at a report the CLI's log level hides
            raise ValueError(f"{shown(name)}: cannot be loaded (its weights' shapes are not those its config.json "
                             "gives; `compress -v` lists them)") from err
        raise ValueError(f"{shown(name)}: cannot be loaded ({type(err).__name__}: {one_line(err, 300)})") from err


def _weights_kwargs(folder: str | Path) -> dict:
    """from_pretrained's loading options for a local folder. A user's folder is read as safetensors only (pickled
    weights can run code); a hub snapshot without safetensors, as the hub serves it, through transformers'
    torch.load(weights_only=True), which unpickles tensors alone."""
    # float32 whatever the config's `dtype` says: transformers 5 loads a config saying float16 (common on the hub)
    # in half precision, which training, the CPU kernels and the int8 export do not take
    return dict(local_files_only=True, use_safetensors=None if is_hub_snapshot(folder) else True,
                dtype=torch.float32)


def check_safetensors(folder: str | Path) -> None:
    """ValueError naming a user's `folder` if it holds no safetensors weights (a hub snapshot may: see
    `_weights_kwargs`), before transformers says only that `model.safetensors` is missing."""
    if _weights_kwargs(folder)["use_safetensors"] and not list(Path(folder).glob("*.safetensors")):
        raise ValueError(f"{shown(folder)}: no safetensors weights (other formats are not loaded: they can run code)")


def load_base(
    base: str | None, num_labels: int = 2, pooling: str = "cls", cache_root=None
) -> tuple[PreTrainedModel, "AutoTokenizer"]:
    """A sequence classifier on top of `base` (a new, randomly initialised head) and its tokenizer.

    base: an embedded name (`compression.bases.EMBEDDED`; None is the default), a folder or a hub id.
    pooling: "cls" (the architecture's own head) or "mean" (`MEAN_POOL_CLASSES`).
    """
    check_pooling(pooling)
    name = resolve_base(base, cache_root)
    check_model_folder(name)
    check_safetensors(name)
    kwargs = dict(num_labels=num_labels, **_weights_kwargs(name))
    with readable_model(name):
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
        if pooling == "mean":
            model_type = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=False).model_type
            model = mean_pool_class(model_type).from_pretrained(name, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(name, trust_remote_code=False, **kwargs)
    log.info("base %s: %s parameters", shown(name), f"{count_parameters(model):,}")
    return model, tokenizer


def load_finetuned(name: str, num_labels: int = 2) -> tuple[PreTrainedModel, "AutoTokenizer"]:
    """An already fine-tuned sequence classifier (a folder or a hub id, as `resolve_base` takes it), used as it is.

    ValueError naming it if it is not a `num_labels`-way classifier.
    """
    name = resolve_base(name)
    check_model_folder(name)
    with readable_model(name):
        config = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=False)
        labels = config.num_labels
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    if labels != num_labels:
        raise ValueError(f"{shown(name)}: a {labels}-label classifier; SST-2 needs {num_labels} "
                         "(0 negative, 1 positive)")
    check_safetensors(name)
    kwargs = _weights_kwargs(name)
    # (the keys of compression.prune, prune_ffn and low_rank, which import this module): shapes from_pretrained
    # cannot rebuild from a stock config
    if any(getattr(config, key, None) is not None for key in ("kept_heads", "kept_neurons", "embedding_rank")):
        raise ValueError(f"{shown(name)}: a pruned or factored model; give the unpruned teacher")
    with readable_model(name):
        model, info = classifier_class(config).from_pretrained(name, output_loading_info=True, **kwargs)
    # transformers only warns (hidden at the CLI's log level) and starts such weights at random
    unloaded = [*info.get("missing_keys", ()), *(str(k[0]) if isinstance(k, tuple) else str(k)
                                                 for k in info.get("mismatched_keys", ()))]
    if unloaded:
        raise ValueError(f"{shown(name)}: {len(unloaded)} weights missing or of another shape (first: "
                         f"{sorted(unloaded)[0]}); a fine-tuned teacher must load whole")
    return model.eval(), tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameter elements (a bnb8 or wo8 int8 weight counts once per element, like its fp32 original;
    an ONNX Runtime model holds no torch parameters: 0, so count its fp32 model's)."""
    return sum(p.numel() for p in model.parameters())


def training_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every submodule's own train/eval flag, for `restore_modes`.

    `model.train(flag)` sets every submodule to one flag: handing a model back with `model.train(was_training)`
    would leave a wrapper's eval-mode inner model (a benchmark's slowed copy, `graphs.GraphedClassifier`, both
    made in train mode) training, its dropout on in every later forward.
    """
    return [(m, m.training) for m in model.modules()]


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Each module back in the mode `training_modes` saw it in."""
    for module, training in modes:
        module.training = training


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode inside the block (no dropout: what is measured is the deterministic function), then
    every submodule back in the mode it came in."""
    modes = training_modes(model)
    model.eval()
    try:
        yield model
    finally:
        restore_modes(modes)


def check_float_model(model: nn.Module, purpose: str) -> None:
    """ValueError unless `model` is not quantized yet (`purpose` says what needs its float weights)."""
    kind = getattr(model, "quantization", (None,))[0]
    if kind is not None:
        raise ValueError(f"{purpose} needs an unquantized model; this one is {kind}-quantized already")


def linear_layers(model: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear not under a skipped prefix; ValueError if there is none."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skip)
    ]
    if not found:
        raise ValueError(f"{type(model).__name__} has no linear layers to quantize")
    return found


# --- where each encoder family keeps its layers and attention ----------------------------------------------


@dataclass(frozen=True)
class EncoderLayout:
    """Where one encoder family keeps its layers, each layer's attention and feed-forward block (dotted paths).

    `layers` is relative to the base model (`model.<base_model_prefix>`); the others to one layer. `attention` is
    the module holding the Q/K/V projections and the head-count attribute `heads`; `output` is the projection
    that reads the heads' concatenated context [B, T, heads * head_size]. `ffn_up` is the feed-forward block's
    first projection (hidden -> intermediate: each output is one neuron, activated before `ffn_down` reads it),
    `ffn_down` its second (intermediate -> hidden); `ffn_size` is the config attribute of the intermediate width.
    """

    layers: str
    attention: str
    query: str
    key: str
    value: str
    output: str
    ffn_up: str
    ffn_down: str
    heads: str = "num_attention_heads"
    ffn_size: str = "intermediate_size"
    # MPNet: the encoder computes one relative-position bias [B, heads, T, T] for all layers, so a layer with
    # heads removed must take only its kept heads' slice of it.
    shared_position_bias: bool = False


_BERT_LAYOUT = EncoderLayout("encoder.layer", "attention.self", "query", "key", "value", "attention.output.dense",
                             "intermediate.dense", "output.dense")
ENCODER_LAYOUTS = {
    "bert": _BERT_LAYOUT,
    "roberta": _BERT_LAYOUT,  # RoBERTa's layers are BERT's (only embeddings and head differ)
    "mpnet": EncoderLayout("encoder.layer", "attention.attn", "q", "k", "v", "attention.attn.o",
                           "intermediate.dense", "output.dense", shared_position_bias=True),
    "distilbert": EncoderLayout("transformer.layer", "attention", "q_lin", "k_lin", "v_lin", "attention.out_lin",
                                "ffn.lin1", "ffn.lin2", heads="n_heads", ffn_size="hidden_dim"),
}


def layout_for(model_type: str | None, purpose: str, what: str | None = None) -> EncoderLayout:
    """The layout of a family by its config's `model_type`; ValueError naming the supported families.

    `purpose` says what needs it ("head pruning"); `what` names the model when it has no model_type. A caller
    can check a base's config with this before any training (cutting a student and pruning need a layout).
    """
    if model_type not in ENCODER_LAYOUTS:
        what = repr(model_type) if model_type else what
        raise ValueError(f"{purpose} supports {', '.join(ENCODER_LAYOUTS)} models, this one is {what}")
    return ENCODER_LAYOUTS[model_type]


def encoder_layout(model: nn.Module, purpose: str) -> EncoderLayout:
    """The layout of `model`'s family; ValueError naming the supported families (`purpose` says what needs it)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return layout_for(model_type, purpose, type(model).__name__)


def encoder_layers(model: nn.Module, purpose: str) -> tuple[nn.Module, str, EncoderLayout]:
    """(module holding the layer list, the list's attribute name, layout) of a supported classifier."""
    layout = encoder_layout(model, purpose)
    parent_path, _, name = layout.layers.rpartition(".")
    base = getattr(model, model.base_model_prefix)
    parent = base.get_submodule(parent_path) if parent_path else base
    if not isinstance(getattr(parent, name, None), nn.ModuleList):
        raise ValueError(f"{purpose}: {type(model).__name__} has no layer list at {layout.layers}")
    return parent, name, layout
