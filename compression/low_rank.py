"""Low-rank word embeddings: the [V, H] table stored as [V, r] rows times an [r, H] projection (ALBERT's
factorization), started from the table's truncated SVD.

Why: once the vocabulary is cut to the training sentences' tokens (`compression.prune_vocab`), the word
embedding is still the largest tensor of a small encoder (SST-2's 11,576 tokens x 384 = 4.4M of the slim
MiniLM-L6's 10.9M parameters). At rank 128 it keeps 1.5M.

In two parts, as the other pruning modules:
- choosing: `low_rank_factors(weight, rank)`, a pure function: the best rank-r approximation of the table in
  Frobenius norm (Eckart-Young), split evenly between the factors (U sqrt(S), sqrt(S) V^T) so that neither
  carries the singular values' whole range into its int8 scales;
- surgery: `factorize_embeddings_(model, config)` puts a `LowRankEmbedding` where the input embedding was and
  records the rank in the config (`embedding_rank`), from which `compression.artifacts` rebuilds the shape
  (`low_rank_shape_`: the module alone, no SVD).
The model's outputs change (the approximation drops the table's smallest directions): the pipeline recovers it
by distillation, as after the other cuts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from compression.models import encoder_layout

log = logging.getLogger(__name__)

RANK_KEY = "embedding_rank"


@dataclass(frozen=True)
class LowRankConfig:
    """The rank of the factored word embedding."""

    rank: int = 128  # columns of the [V, r] rows; below the hidden size, or nothing is saved

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a whole number >= 1, got {self.rank!r}")


class LowRankEmbedding(nn.Module):
    """An `nn.Embedding` [V, H] held as two factors: ids [*] -> rows [*, r] -> projection -> [*, H]."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx
        self.rows = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx, device=device, dtype=dtype)
        self.projection = nn.Linear(rank, embedding_dim, bias=False, device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.projection(self.rows(input_ids))

    @property
    def weight(self) -> torch.Tensor:
        """The whole table [V, H] the factors stand for (computed; for code that reads an embedding's weight)."""
        return self.projection(self.rows.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [V, r], projection [r, H]) whose product is the best rank-r approximation of `weight` [V, H].

    ValueError unless 1 <= rank < min(V, H) (at min(V, H) the factors hold more than the table).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be a [V, H] table, got shape {tuple(weight.shape)}")
    if not 1 <= rank < min(weight.shape):
        raise ValueError(f"rank must be in 1..{min(weight.shape) - 1} for a {tuple(weight.shape)} table, got {rank}")
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


def saves(rank: int, num_embeddings: int, embedding_dim: int) -> bool:
    """Whether factors of `rank` hold fewer numbers than the [V, H] table: r (V + H) < V H."""
    return rank * (num_embeddings + embedding_dim) < num_embeddings * embedding_dim


def check_rank(rank: int, num_embeddings: int, embedding_dim: int) -> None:
    """ValueError unless factoring a [V, H] table at `rank` stores fewer numbers than the table."""
    if not saves(rank, num_embeddings, embedding_dim):
        raise ValueError(f"embedding rank {rank} saves nothing on a {num_embeddings} x {embedding_dim} table: "
                         f"it must be below {num_embeddings * embedding_dim // (num_embeddings + embedding_dim)}")


def low_rank_shape_(model: nn.Module, config: LowRankConfig) -> LowRankEmbedding:
    """Put an untrained `LowRankEmbedding` of rank `config.rank` where the model's input `nn.Embedding` [V, H]
    is, in place, and record `config.embedding_rank`: the shape a saved factored model's weights load into.
    ValueError if the input embedding is not a plain `nn.Embedding` or the rank saves nothing."""
    encoder_layout(model, "embedding factorization")
    old = model.get_input_embeddings()
    if not isinstance(old, nn.Embedding):
        raise ValueError(f"embedding factorization: {type(model).__name__}'s input embedding is "
                         f"{type(old).__name__}, not an nn.Embedding (already factored?)")
    check_rank(config.rank, old.num_embeddings, old.embedding_dim)
    new = LowRankEmbedding(old.num_embeddings, old.embedding_dim, config.rank, old.padding_idx,
                           device=old.weight.device, dtype=old.weight.dtype)
    model.set_input_embeddings(new)
    setattr(model.config, RANK_KEY, config.rank)
    return new


@torch.no_grad()
def factorize_embeddings_(model: nn.Module, config: LowRankConfig = LowRankConfig()) -> None:
    """Replace the model's input embedding [V, H] by a `LowRankEmbedding` of rank `config.rank`, in place,
    started from `low_rank_factors`; records `config.embedding_rank`. ValueError as `low_rank_shape_`."""
    table = model.get_input_embeddings().weight
    new = low_rank_shape_(model, config)
    rows, projection = low_rank_factors(table, config.rank)
    new.rows.weight.copy_(rows)
    new.projection.weight.copy_(projection.T)  # nn.Linear keeps [out, in]
    log.info("word embedding %d x %d factored at rank %d", new.num_embeddings, new.embedding_dim, config.rank)
