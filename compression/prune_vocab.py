"""Vocabulary pruning: keep the word-embedding rows of the tokens the training sentences use, and a tokenizer
that numbers those tokens 0..K-1.

In three parts, as head pruning (`compression.prune`):
- choosing: the ids to keep, a pure function of the training rows' token ids (`kept_token_ids`), plus what the
  tokenizer needs to build the kept tokens (`complete_keep_ids`: a BPE's alphabet and merge intermediates);
- surgery: the embedding cut to the kept rows, the config's special-token ids renumbered (`prune_vocabulary_`);
- the tokenizer: a standard `PreTrainedTokenizerFast` whose model vocabulary holds only the kept tokens, under
  their new ids (`pruned_tokenizer`).

What happens to a token that was not kept: its string leaves the tokenizer's vocabulary, so the tokenizer's own
algorithm spells the text with the kept tokens, as it does any word it has no token for (WordPiece: longest kept
pieces, else [UNK] for the word; BPE: the merges that remain, down to its bytes). Mapping each unkept token to
[UNK] in place would need a vocabulary in which several strings share one id; `tokenizers` (0.23) accepts that
in memory but writes one string per id when it saves, so the saved tokenizer would segment differently from the
one in memory, or fail to load. Removing the strings is what survives save/load, and every text whose tokens
are all kept (every training row) is segmented exactly as before, so the model's logits on it are unchanged:
WordPiece's greedy longest match and BPE's lowest-rank merge never chose a removed token there. It also reads
better: SST-2's train split keeps 11,576 of MiniLM's 30,522 tokens, 331 of the 872 validation sentences hold an
unkept one, and the full profile's fine-tuned 6-layer student scored 89.79% on validation pruned this way (as
unpruned) and 88.99% with [UNK] in place of each unkept token.

Token ids always refer to the model's and tokenizer's current numbering (a model pruned twice is numbered by the
first pruning); the config records the kept count (`kept_tokens`) and the vocabulary size before the first
pruning (`original_vocab_size`).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compression.models import encoder_layout

log = logging.getLogger(__name__)

KEPT_TOKENS_KEY = "kept_tokens"
ORIGINAL_VOCAB_KEY = "original_vocab_size"
# Config attributes holding token ids, renumbered with the vocabulary.
TOKEN_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                 "unk_token_id", "mask_token_id", "decoder_start_token_id")
TOKENIZER_MODELS = ("WordPiece", "BPE")  # tokenizers' model types this module can prune


@dataclass(frozen=True)
class VocabPruneConfig:
    """Which tokens keep their embedding rows."""

    min_count: int = 1  # occurrences in the training rows a token needs; special tokens are always kept

    def __post_init__(self):
        if isinstance(self.min_count, bool) or not isinstance(self.min_count, int) or self.min_count < 1:
            raise ValueError(f"min_count must be a whole number >= 1, got {self.min_count!r}")


# --- choosing ----------------------------------------------------------------------------------------------


def kept_token_ids(
    token_ids: Iterable[Sequence[int]], special_ids: Iterable[int], vocab_size: int, min_count: int = 1
) -> torch.Tensor:
    """Sorted unique ids (int64 [K]) occurring at least `min_count` times in the rows, plus every special id.

    token_ids: the training rows as token ids (one sequence per sentence); special_ids: the tokenizer's special
    tokens ([PAD], [UNK], [CLS], [SEP], [MASK] or their family's equivalents). ValueError naming an id outside
    0..vocab_size-1, or if nothing would be kept.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    VocabPruneConfig(min_count)  # the same validation as the config's
    rows = [list(row) for row in token_ids]
    flat = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)
    bad = ((flat < 0) | (flat >= vocab_size)).nonzero().flatten()
    if bad.numel():
        row = int(torch.searchsorted(torch.tensor(list(itertools.accumulate(map(len, rows)))), bad[0], right=True))
        raise ValueError(f"token id {int(flat[bad[0]])} in row {row} is out of range 0..{vocab_size - 1}")
    specials = sorted(set(special_ids))
    outside = [i for i in specials if not 0 <= i < vocab_size]
    if outside:
        raise ValueError(f"special token id {outside[0]} is out of range 0..{vocab_size - 1}")
    keep = torch.bincount(flat, minlength=vocab_size) >= min_count  # bool [V]
    keep[torch.tensor(specials, dtype=torch.long)] = True
    if not keep.any():
        raise ValueError(f"no token ids to keep: none occurs {min_count} times and there are no special tokens")
    return keep.nonzero().flatten()


def check_keep_ids(keep_ids: torch.Tensor, vocab_size: int, what: str = "the vocabulary") -> list[int]:
    """`keep_ids` as a list, after checking it is a non-empty, strictly increasing 1-D integer tensor of ids in
    0..vocab_size-1 (ValueError naming what is wrong)."""
    if not isinstance(keep_ids, torch.Tensor) or keep_ids.dim() != 1:
        shape = tuple(keep_ids.shape) if isinstance(keep_ids, torch.Tensor) else type(keep_ids).__name__
        raise ValueError(f"keep_ids must be a 1-D tensor of token ids, got {shape}")
    if keep_ids.dtype.is_floating_point or keep_ids.dtype.is_complex or keep_ids.dtype == torch.bool:
        raise ValueError(f"keep_ids must hold integer ids, got {keep_ids.dtype}")
    if keep_ids.numel() == 0:
        raise ValueError("keep_ids is empty: a vocabulary must keep at least its special tokens")
    ids = keep_ids.tolist()
    if min(ids) < 0 or max(ids) >= vocab_size:
        outside = next(i for i in ids if not 0 <= i < vocab_size)
        raise ValueError(f"keep id {outside} is out of range 0..{vocab_size - 1} of {what}")
    if any(a >= b for a, b in zip(ids, ids[1:])):
        raise ValueError("keep_ids must be sorted and unique (the new ids follow their order)")
    return ids


# --- surgery -----------------------------------------------------------------------------------------------


def renumbering(keep: list[int]) -> dict[int, int]:
    """old id -> new id for the kept ids (their rank among `keep`)."""
    return {old: new for new, old in enumerate(keep)}


@torch.no_grad()
def prune_vocabulary_(model: nn.Module, keep_ids: torch.Tensor) -> None:
    """Cut the word embedding [V, H] to the rows `keep_ids` (sorted unique ids [K]) in place; row i of the new
    table is row keep_ids[i] of the old, so the model reads the ids of `pruned_tokenizer(tokenizer, keep_ids)`.

    The config's vocab_size becomes K and its special-token ids are renumbered; the padding token must keep its
    id (RoBERTa and MPNet number positions from it). ValueError if a special id the config names is not kept.
    """
    encoder_layout(model, "vocabulary pruning")  # the families whose embeddings and ids are known
    config = model.config
    old = model.get_input_embeddings()
    if not isinstance(old, nn.Embedding) or old.num_embeddings != config.vocab_size:
        raise ValueError(f"vocabulary pruning: {type(model).__name__}'s input embedding is not an nn.Embedding "
                         f"of its config's {config.vocab_size} rows")
    keep = check_keep_ids(keep_ids, config.vocab_size, f"the model's {config.vocab_size} embedding rows")
    new_id = renumbering(keep)
    ids = {key: getattr(config, key) for key in TOKEN_ID_KEYS if getattr(config, key, None) is not None}
    for key, value in ids.items():
        for i in value if isinstance(value, list) else [value]:
            if i not in new_id:
                raise ValueError(f"config.{key} = {i} is not among the kept ids (keep the special tokens)")
    pad = ids.get("pad_token_id")
    if pad is not None and new_id[pad] != pad:
        raise ValueError(f"the padding token {pad} would become {new_id[pad]}: it must keep its id (RoBERTa and "
                         "MPNet number positions from it), so keep every id below it")
    index = torch.tensor(keep, dtype=torch.long, device=old.weight.device)
    padding_idx = new_id.get(old.padding_idx) if old.padding_idx is not None else None
    new = nn.Embedding(len(keep), old.embedding_dim, padding_idx=padding_idx, device=old.weight.device,
                       dtype=old.weight.dtype)
    new.weight.copy_(old.weight.index_select(0, index))
    new.weight.requires_grad_(old.weight.requires_grad)
    model.set_input_embeddings(new)
    for key, value in ids.items():
        setattr(config, key, [new_id[i] for i in value] if isinstance(value, list) else new_id[value])
    if getattr(config, ORIGINAL_VOCAB_KEY, None) is None:
        setattr(config, ORIGINAL_VOCAB_KEY, config.vocab_size)
    config.vocab_size = len(keep)
    setattr(config, KEPT_TOKENS_KEY, len(keep))


# --- the tokenizer -----------------------------------------------------------------------------------------


def _backend_state(tokenizer) -> dict:
    """The tokenizer's `tokenizers` pipeline as its tokenizer.json dict; ValueError if it has none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"vocabulary pruning needs a `tokenizers`-backed tokenizer, got {type(tokenizer).__name__}")
    state = json.loads(backend.to_str())
    kind = state["model"]["type"]
    if kind not in TOKENIZER_MODELS:
        raise ValueError(f"vocabulary pruning supports {' and '.join(TOKENIZER_MODELS)} tokenizers, "
                         f"this one is {kind} ({type(tokenizer).__name__})")
    return state


def _merge_parts(merge) -> tuple[str, str]:
    """A BPE merge as (left, right): tokenizer.json writes a pair, older files "left right"."""
    left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
    return left, right


def _bpe_merges(model: dict) -> list[tuple[str, str, str]]:
    """(left, right, result) of each merge of a BPE model state, in rank order."""
    prefix = len(model.get("continuing_subword_prefix") or "")
    return [(a, b, a + b[prefix:]) for a, b in map(_merge_parts, model.get("merges", []))]


def complete_keep_ids(tokenizer, keep_ids: torch.Tensor) -> torch.Tensor:
    """`keep_ids` plus the ids the tokenizer's model needs to still build every kept token (sorted unique [K']).

    WordPiece needs nothing more. BPE needs its alphabet (every token no merge makes: any text stays spellable)
    and, for each kept token, both parts of every merge that makes it, and so on down.
    """
    state = _backend_state(tokenizer)
    vocab = state["model"]["vocab"]
    keep = set(check_keep_ids(keep_ids, _id_count(state), "the tokenizer"))
    if state["model"]["type"] == "BPE":
        makers: dict[str, list[tuple[str, str]]] = {}
        for a, b, result in _bpe_merges(state["model"]):
            makers.setdefault(result, []).append((a, b))
        names = {i: t for t, i in vocab.items()}
        todo = [names[i] for i in keep if i in names] + [t for t in vocab if t not in makers]
        seen: set[str] = set()
        while todo:
            token = todo.pop()
            if token in seen:
                continue
            seen.add(token)
            todo += [part for pair in makers.get(token, ()) for part in pair]
        keep |= {vocab[t] for t in seen if t in vocab}
    return torch.tensor(sorted(keep), dtype=torch.long)


def _id_count(state: dict) -> int:
    """One past the largest id of the model vocabulary and the added tokens."""
    ids = list(state["model"]["vocab"].values()) + [a["id"] for a in state["added_tokens"]]
    return max(ids) + 1


def _renumber_processor(processor: dict | None, new_id: dict[int, int]) -> dict | None:
    """A post-processor state with its special-token ids renumbered; ValueError if one is not kept."""
    if processor is None or processor["type"] == "ByteLevel":
        return processor

    def renumbered(i: int, name: str) -> int:
        if i not in new_id:
            raise ValueError(f"the post-processor adds {name!r} (id {i}), which is not among the kept ids")
        return new_id[i]

    processor = dict(processor)
    kind = processor["type"]
    if kind == "TemplateProcessing":
        processor["special_tokens"] = {
            name: dict(token, ids=[renumbered(i, name) for i in token["ids"]])
            for name, token in processor["special_tokens"].items()
        }
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for role in ("sep", "cls"):
            name, i = processor[role]
            processor[role] = [name, renumbered(i, name)]
    elif kind == "Sequence":
        processor["processors"] = [_renumber_processor(p, new_id) for p in processor["processors"]]
    else:
        raise ValueError(f"vocabulary pruning does not know the {kind} post-processor")
    return processor


def pruned_tokenizer(tokenizer, keep_ids: torch.Tensor):
    """A `PreTrainedTokenizerFast` with only the tokens `keep_ids` (sorted unique [K]), token keep_ids[i] as id i.

    Normalizer, pre-tokenizer, decoder and special tokens are the original's; the post-processor's and the added
    tokens' ids are renumbered. Text whose tokens are all kept gets the original's tokens, under the new ids;
    other text is spelled with the kept tokens (see the module docstring). ValueError for a tokenizer other than
    WordPiece or BPE, a special token or [UNK] not kept, or a BPE `keep_ids` missing what `complete_keep_ids`
    adds.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = _backend_state(tokenizer)
    model = state["model"]
    keep = check_keep_ids(keep_ids, _id_count(state), "the tokenizer")
    names = {i: t for t, i in model["vocab"].items()} | {a["id"]: a["content"] for a in state["added_tokens"]}
    unnamed = [i for i in keep if i not in names]
    if unnamed:
        raise ValueError(f"keep id {unnamed[0]} names no token of the tokenizer")
    needed = sorted(set(complete_keep_ids(tokenizer, keep_ids).tolist()) - set(keep))
    if needed:
        raise ValueError(f"the BPE merges that build the kept tokens need {len(needed)} more ids (e.g. "
                         f"{needed[0]} {names[needed[0]]!r}): prune with complete_keep_ids(tokenizer, keep_ids)")
    new_id = renumbering(keep)
    for token in tokenizer.all_special_tokens:
        old = tokenizer.convert_tokens_to_ids(token)
        if old not in new_id:
            raise ValueError(f"special token {token!r} (id {old}) is not among the kept ids")
    model["vocab"] = {t: new_id[i] for t, i in model["vocab"].items() if i in new_id}
    if model["type"] == "BPE":  # a merge stays only if both parts and its result are kept, in its rank order
        kept = model["vocab"]
        model["merges"] = [[a, b] for a, b, result in _bpe_merges(model) if a in kept and b in kept and result in kept]
    if model.get("unk_token") is not None and model["unk_token"] not in model["vocab"]:
        raise ValueError(f"the unknown token {model['unk_token']!r} is not among the kept ids")
    state["added_tokens"] = [dict(a, id=new_id[a["id"]]) for a in state["added_tokens"] if a["id"] in new_id]
    state["post_processor"] = _renumber_processor(state["post_processor"], new_id)
    if state.get("padding"):  # a tokenizer saved with padding enabled pads with this id
        state["padding"] = dict(state["padding"], pad_id=new_id[state["padding"]["pad_id"]])
    extra = [t for t in getattr(tokenizer, "extra_special_tokens", None) or [] if isinstance(t, str)]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        **tokenizer.special_tokens_map,
        **({"extra_special_tokens": extra} if extra else {}),
        model_input_names=list(tokenizer.model_input_names),
        model_max_length=tokenizer.model_max_length,
        padding_side=tokenizer.padding_side,
        truncation_side=tokenizer.truncation_side,
        clean_up_tokenization_spaces=tokenizer.clean_up_tokenization_spaces,
    )


# --- all three, from training sentences --------------------------------------------------------------------


def prune_to_corpus_(
    model: nn.Module, tokenizer, sentences: Iterable[str], config: VocabPruneConfig = VocabPruneConfig()
):
    """Prune `model` in place to the tokens `sentences` use (`config.min_count`) and return its tokenizer.

    The sentences are tokenized whole (no truncation): a superset of what training read.
    """
    rows = tokenizer(list(sentences), add_special_tokens=False, truncation=False)["input_ids"]
    keep = kept_token_ids(rows, tokenizer.all_special_ids, len(tokenizer), config.min_count)
    keep = complete_keep_ids(tokenizer, keep)
    log.info("vocabulary: keeping %d of %d tokens (min_count %d)", len(keep), len(tokenizer), config.min_count)
    new_tokenizer = pruned_tokenizer(tokenizer, keep)
    prune_vocabulary_(model, keep)
    return new_tokenizer
