"""Structural attention-head pruning for BERT, RoBERTa, MPNet and DistilBERT sequence classifiers.

transformers 5 removed `prune_heads` and `head_mask`, so head removal lives here, in three separate parts:
- scoring: Michel et al. 2019's importance, E_x |dL/dξ_h| for a gate ξ_h on each head's context, normalised
  per layer (`head_importance`);
- choosing: a keep-mask from scores, a pure function on tensors (`keep_mask_from_scores`);
- surgery: cutting the kept heads' rows out of Q/K/V and columns out of the output projection (`prune_heads_`),
  so the model really is smaller and faster, not masked.

Where each family keeps those projections is `compression.models.ENCODER_LAYOUTS`. MPNet adds one relative-position
bias [B, heads, T, T], computed once by the encoder for all layers; a pruned MPNet layer reads only its kept heads'
slice of it through a forward pre-hook (`_kept_heads_bias`).

Head indices always refer to the original heads of the unpruned model; a pruned model carries them in its config
(`kept_heads`, a list per layer) so that it can be saved and loaded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from compression.models import EncoderLayout, check_float_model, encoder_layers, evaluating

log = logging.getLogger(__name__)

KEPT_HEADS_KEY = "kept_heads"
KEPT_BIAS_ATTR = "kept_bias_heads"  # on a pruned MPNet self-attention: original heads whose bias it reads


@dataclass(frozen=True)
class PruneConfig:
    """How many heads go and how their importance is estimated."""

    remove: float = 0.25  # a fraction of all heads (0 < x < 1), or a count (a whole number >= 1)
    importance_batches: int = 64  # training batches of gradients accumulated into the scores
    batch_size: int = 32

    def __post_init__(self):
        if isinstance(self.remove, bool) or not (0 < self.remove < 1 or (self.remove >= 1
                                                                         and float(self.remove).is_integer())):
            raise ValueError(f"remove must be a fraction in (0, 1) or a whole count >= 1, got {self.remove}")
        if self.importance_batches < 1:
            raise ValueError(f"importance_batches must be >= 1, got {self.importance_batches}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


# --- model structure ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadSite:
    """One encoder layer's self-attention, as `EncoderLayout` names its parts."""

    layer: nn.Module  # the encoder layer
    attention: nn.Module  # holds the Q/K/V projections and the head count
    layout: EncoderLayout

    @property
    def heads(self) -> int:
        return getattr(self.attention, self.layout.heads)

    @property
    def head_size(self) -> int:
        return self.projection("query").out_features // self.heads

    def projection(self, role: str) -> nn.Linear:
        """The Q, K or V projection ("query", "key", "value"), or "output" (reads the concatenated heads)."""
        if role == "output":
            return self.layer.get_submodule(self.layout.output)
        return self.attention.get_submodule(getattr(self.layout, role))

    def replace(self, role: str, linear: nn.Linear) -> None:
        if role == "output":
            owner, path = self.layer, self.layout.output
        else:
            owner, path = self.attention, getattr(self.layout, role)
        parent, _, name = path.rpartition(".")
        setattr(owner.get_submodule(parent) if parent else owner, name, linear)


def attention_sites(model: nn.Module) -> list[HeadSite]:
    """Each encoder layer's self-attention, in order; ValueError naming the supported families."""
    parent, name, layout = encoder_layers(model, "head pruning")
    try:
        return [HeadSite(layer, layer.get_submodule(layout.attention), layout) for layer in getattr(parent, name)]
    except AttributeError as err:  # a transformers version that moved the modules
        raise ValueError(f"head pruning: {type(model).__name__} is not laid out as expected ({err})") from None


def kept_heads(model: nn.Module) -> list[list[int]]:
    """Original indices of the heads each layer still has."""
    stored = getattr(model.config, KEPT_HEADS_KEY, None)
    if stored is not None:
        return [list(layer) for layer in stored]
    return [list(range(site.heads)) for site in attention_sites(model)]


def keep_mask_from_kept(kept: list[list[int]], num_heads: int, unit: str = "head") -> torch.Tensor:
    """bool [layers, num_heads] with True at the listed heads (or other units: FFN neurons)."""
    mask = torch.zeros(len(kept), num_heads, dtype=torch.bool)
    for layer, heads in enumerate(kept):
        for h in heads:
            if not 0 <= h < num_heads:
                raise ValueError(f"{unit} index {h} in layer {layer} is out of range 0..{num_heads - 1}")
            mask[layer, h] = True
    return mask


def check_mask(keep: torch.Tensor, num_layers: int, num_heads: int, unit: str = "head") -> None:
    """Raise ValueError unless `keep` is a bool [num_layers, num_heads] mask leaving every layer a head (`unit`)."""
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        got = keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"keep mask must be a bool tensor, got {got}")
    if tuple(keep.shape) != (num_layers, num_heads):
        raise ValueError(f"keep mask has shape {tuple(keep.shape)}, expected ({num_layers}, {num_heads})")
    empty = (~keep.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"keep mask removes every {unit} of layer {empty[0]}; a layer must keep at least one")


def check_kept_subset(keep_row: torch.Tensor, have: list[int], layer: int, unit: str = "head") -> list[int]:
    """Original indices that `keep_row` (bool [original units]) keeps; ValueError if one was already removed."""
    want = keep_row.nonzero().flatten().tolist()
    present = set(have)
    gone = [u for u in want if u not in present]
    if gone:
        raise ValueError(f"keep mask keeps {unit} {gone[0]} of layer {layer}, which was already removed")
    return want


# --- surgery -----------------------------------------------------------------------------------------------


def _rows(positions: list[int], head_size: int) -> torch.Tensor:
    return torch.cat([torch.arange(p * head_size, (p + 1) * head_size) for p in positions])


def cut_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping `index` along `dim` of the weight (0: outputs, 1: inputs)."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device)).clone()
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    if dim == 0 and bias is not None:
        bias = bias[index.to(bias.device)]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    if bias is not None:
        out.bias.data.copy_(bias)
    return out


def _kept_heads_bias(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook (with kwargs) on a head-pruned MPNet self-attention: the encoder-wide relative-position
    bias [B, original heads, T, T] cut to this layer's kept heads [B, kept, T, T] (`module.kept_bias_heads`)."""
    heads = getattr(module, KEPT_BIAS_ATTR)
    if len(args) > 2 and args[2] is not None:  # MPNetAttention passes it positionally
        args = (*args[:2], args[2].index_select(1, heads), *args[3:])
    elif kwargs.get("position_bias") is not None:
        kwargs = {**kwargs, "position_bias": kwargs["position_bias"].index_select(1, heads)}
    return args, kwargs


def _cut_position_bias(attention: nn.Module, heads: list[int]) -> None:
    """Make `attention` read only `heads` (original indices) of the shared position bias.

    The indices are a buffer on the module's device, not a Python list: indexing by a list builds a host tensor
    and copies it to the GPU in every forward, one synchronous copy per layer that also breaks a CUDA-graph
    capture. Non-persistent, so the saved state dict is unchanged. The hook is registered once per module
    (deepcopy keeps it; a loaded model gets it again from `prune_heads_` in `artifacts.empty_classifier`);
    pruning again only changes the heads it reads.
    """
    if not hasattr(attention, KEPT_BIAS_ATTR):
        attention.register_forward_pre_hook(_kept_heads_bias, with_kwargs=True)
    device = next(attention.parameters()).device
    attention.register_buffer(KEPT_BIAS_ATTR, torch.tensor(heads, device=device), persistent=False)


@torch.no_grad()
def prune_heads_(model: nn.Module, keep: torch.Tensor) -> nn.Module:
    """Remove, in place, every head whose `keep[layer, head]` is False (bool [layers, original heads]).

    Heads already removed must be False. Returns `model`, whose config records the heads kept.
    """
    check_float_model(model, "head pruning")
    sites = attention_sites(model)
    num_heads = model.config.num_attention_heads
    check_mask(keep, len(sites), num_heads)
    current = kept_heads(model)
    for layer_index, (site, have) in enumerate(zip(sites, current)):
        want = check_kept_subset(keep[layer_index], have, layer_index)
        if want == have:
            continue
        head_size = site.head_size
        index = _rows([have.index(h) for h in want], head_size)
        for role in ("query", "key", "value"):
            site.replace(role, cut_linear(site.projection(role), index, 0))
        site.replace("output", cut_linear(site.projection("output"), index, 1))
        setattr(site.attention, site.layout.heads, len(want))
        if hasattr(site.attention, "all_head_size"):  # BERT, RoBERTa, MPNet reshape by it; DistilBERT by -1
            site.attention.all_head_size = len(want) * head_size
        if site.layout.shared_position_bias:
            _cut_position_bias(site.attention, want)
        current[layer_index] = want
    setattr(model.config, KEPT_HEADS_KEY, current)
    return model


# --- gates on head outputs (importance, and the tests' reference for equivalence) ---------------------------


@contextlib.contextmanager
def head_gates(model: nn.Module, gate_fn) -> Iterator[list[torch.Tensor]]:
    """Multiply each head's context by a gate while inside the block.

    `gate_fn(layer_index, batch_size, heads) -> Tensor [B, heads]` makes the gate for each forward; the gates
    used are appended to the yielded list in call order (one per layer per forward).
    """
    used: list[torch.Tensor] = []
    handles = []

    def hook_for(layer_index: int, head_size: int):
        def pre_hook(module, args):
            (context,) = args  # [B, T, heads * head_size]
            b, t, width = context.shape
            heads = width // head_size
            gate = gate_fn(layer_index, b, heads)
            used.append(gate)
            gated = context.view(b, t, heads, head_size) * gate.to(context.dtype)[:, None, :, None]
            return (gated.view(b, t, width),)

        return pre_hook

    try:
        for i, site in enumerate(attention_sites(model)):
            handles.append(site.projection("output").register_forward_pre_hook(hook_for(i, site.head_size)))
        yield used
    finally:
        for h in handles:
            h.remove()


def head_importance(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Importance [layers, heads] of an unpruned model: sum over examples of |dL/dξ_h|, L2-normalised per layer.

    `batches` yield model inputs with `labels`; L is the model's own loss (cross-entropy on the labels).
    """
    if getattr(model.config, KEPT_HEADS_KEY, None) is not None:
        raise ValueError("head_importance needs an unpruned model (this one already has heads removed)")
    check_float_model(model, "head_importance")
    attention_sites(model)  # an unsupported family is refused before any batch is read
    return gate_importance(model, batches, head_gates, model.config.num_attention_heads, "head_importance")


def gate_importance(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], gates, units: int,
                    caller: str) -> torch.Tensor:
    """Sum over examples of |dL/dξ| for a gate ξ on each of `units` per layer, L2-normalised per layer: [L, units].

    `gates(model, gate_fn)` installs the gates (`head_gates`, `prune_ffn.ffn_gates`); each is 1, one per example
    and unit, so the forward is the model's own and dL/dξ is the first-order change of the loss when that unit is
    removed for that example. `batches` yield model inputs with `labels` (as `data.batches(..., with_labels=True)`
    makes them: its `index` is dropped); L is the model's own loss.
    """
    device = next(model.parameters()).device
    scores: torch.Tensor | None = None

    def make_gate(layer_index, b, width):
        return torch.ones(b, width, device=device, requires_grad=True)

    with evaluating(model):  # no dropout: the score is of the deterministic function
        for batch in batches:
            if "labels" not in batch:
                raise ValueError(f"{caller} needs batches with labels (data.batches(..., with_labels=True)): the "
                                 "scores are gradients of the model's own loss")
            batch = {k: v.to(device) for k, v in batch.items() if k != "index"}
            with gates(model, make_gate) as used:
                # the model's loss is its batch's mean: times B, each example's gradient is its own loss's,
                # whatever batch it came in (a short last batch would otherwise weigh its examples more)
                loss = model(**batch).loss * batch["labels"].shape[0]
                grads = torch.autograd.grad(loss, used)  # one [B, units] per layer, in layer order
            if scores is None:
                scores = torch.zeros(len(grads), units, dtype=torch.float64)
            for layer_index, g in enumerate(grads):
                scores[layer_index] += g.abs().sum(0).double().cpu()
    if scores is None:
        raise ValueError(f"{caller} got no batches")
    return normalize_per_layer(scores).float()


# --- choosing ----------------------------------------------------------------------------------------------


def normalize_per_layer(scores: torch.Tensor) -> torch.Tensor:
    """scores [L, H] divided by each layer's L2 norm (Michel et al.: makes layers comparable)."""
    norms = scores.norm(dim=1, keepdim=True)
    return scores / torch.where(norms > 0, norms, torch.ones_like(norms))


def heads_to_remove(remove: float, num_layers: int, num_heads: int) -> int:
    """The count that `remove` (a fraction or a count) asks for; ValueError if it would empty a layer."""
    return count_to_remove(remove, num_layers, num_heads)


def count_to_remove(remove: float, num_layers: int, per_layer: int, min_keep: int = 1, unit: str = "heads") -> int:
    """How many of `num_layers * per_layer` units `remove` asks for: a fraction of them (0 < x < 1), or a count.

    ValueError if that would leave a layer fewer than `min_keep`.
    """
    if isinstance(remove, bool) or not (0 < remove < 1 or (remove >= 0 and float(remove).is_integer())):
        raise ValueError(f"remove must be a fraction in (0, 1) or a whole count, got {remove!r}")
    total = num_layers * per_layer
    n = round(remove * total) if 0 < remove < 1 else int(remove)
    most = num_layers * max(per_layer - min_keep, 0)
    if n < 0 or n > most:
        keeps = "one" if min_keep == 1 else f"{min_keep}"
        raise ValueError(
            f"cannot remove {n} of {total} {unit}: each of the {num_layers} layers must keep {keeps} (at most {most})"
        )
    return n


def keep_mask_from_scores(scores: torch.Tensor, remove: float) -> torch.Tensor:
    """bool [L, H] keep-mask removing the `remove` lowest-scoring heads, globally ranked.

    Each layer's best head is never removed, so no layer is emptied; among all other heads, no kept head scores
    below a removed one. Ties go to the lower (layer, head) index being removed first.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [layers, heads], got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    num_layers, num_heads = scores.shape
    n = heads_to_remove(remove, num_layers, num_heads)
    keep = torch.ones(num_layers, num_heads, dtype=torch.bool)
    protected = torch.zeros_like(keep)
    protected[torch.arange(num_layers), scores.argmax(dim=1)] = True
    flat = scores.flatten()
    order = sorted(range(flat.numel()), key=lambda i: (flat[i].item(), i))
    candidates = [i for i in order if not protected.flatten()[i]]
    keep.view(-1)[torch.tensor(candidates[:n], dtype=torch.long)] = False
    return keep
