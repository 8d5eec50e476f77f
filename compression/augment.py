"""Teacher-labelled augmentation: new training sentences made by swapping words for their neighbours.

TinyBERT (Jiao et al. 2020) grew SST-2's train split twenty-fold by replacing words with similar ones (GloVe
neighbours, or a masked LM's guesses) and let the teacher label every new sentence; the student then learns the
teacher's function on many more inputs than the labels cover. Neither GloVe nor a masked-LM head ships offline
here, so the neighbours come from a model's own word-piece embedding table (cosine similarity between whole-word
rows): near rows are mostly related words and inflections, which is what the swap needs. The new sentences have no
labels of their own: their targets are the teacher's logits over them, and the teacher's choice (the argmax) is
their label in the labels' term of the loss (`pipeline`'s augmented stage).

Pure functions: `whole_sentences` picks the rows to grow from, `neighbour_table` ranks the candidates,
`augment` writes the new sentences, `augmented_sentences` chains them. Nothing here runs a model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import datasets
import torch


@dataclass(frozen=True)
class AugmentConfig:
    """How many new sentences, and how different from their source."""

    copies: int = 8  # new sentences per source sentence (TinyBERT used 20)
    replace_prob: float = 0.4  # chance each replaceable word is swapped (TinyBERT's 0.4)
    neighbours: int = 15  # a swapped word becomes one of its this-many nearest whole words (TinyBERT's K = 15)
    min_words: int = 4  # shorter sentences are not grown from
    seed: int = 42

    def __post_init__(self):
        if self.copies < 1:
            raise ValueError(f"copies must be >= 1, got {self.copies}")
        if not 0.0 < self.replace_prob <= 1.0:
            raise ValueError(f"replace_prob must be in (0, 1], got {self.replace_prob}")
        if self.neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {self.neighbours}")
        if self.min_words < 1:
            raise ValueError(f"min_words must be >= 1, got {self.min_words}")


def whole_sentences(sentences: list[str], min_words: int = 1) -> list[int]:
    """Indices of the rows of at least `min_words` words that are no word span of a longer row.

    SST-2's train split is every phrase of the parse trees of about 6,900 sentences; these are the trees' roots.
    """
    words = [s.split() for s in sentences]
    long_rows = [i for i, w in enumerate(words) if len(w) >= min_words]
    inner: set[str] = set()
    for i in long_rows:
        w = words[i]
        inner |= {" ".join(w[a:b]) for a in range(len(w)) for b in range(a + min_words, len(w) + 1)
                  if b - a < len(w)}
    return [i for i in long_rows if " ".join(words[i]) not in inner]


def neighbour_table(
    embeddings: torch.Tensor,  # [V, D] a model's word-piece embedding table
    candidates: torch.Tensor,  # [C] ids of the rows that may replace or be replaced (whole words)
    k: int,
) -> torch.Tensor:
    """[C, min(k, C - 1)] positions into `candidates`: each candidate's nearest others by cosine, nearest first.

    A row is never its own neighbour.
    """
    rows = torch.nn.functional.normalize(embeddings[candidates].float(), dim=-1)  # [C, D]
    k = min(k, len(candidates) - 1)
    out = []
    for start in range(0, len(rows), 2048):  # [2048, C] similarities at a time, not [C, C]
        sims = rows[start:start + 2048] @ rows.T
        sims[torch.arange(sims.shape[0]), torch.arange(start, start + sims.shape[0])] = -float("inf")
        out.append(sims.topk(k, dim=-1).indices)
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long)


def augment(sentences: list[str], neighbours: dict[str, list[str]], config: AugmentConfig) -> list[str]:
    """`config.copies` new sentences per sentence: each word with neighbours swapped with `replace_prob`.

    Only copies that differ from their source and from each other are kept, so a sentence without replaceable
    words gives none. Deterministic for a given seed.
    """
    return [new for _, new in augment_with_sources(sentences, neighbours, config)]


def augment_with_sources(
    sentences: list[str], neighbours: dict[str, list[str]], config: AugmentConfig
) -> list[tuple[int, str]]:
    """`augment`'s sentences, in its order, each with the index into `sentences` of the sentence it grew from."""
    rng = random.Random(config.seed)
    out = []
    for source, sentence in enumerate(sentences):
        words = sentence.split()
        seen = {" ".join(words)}
        for _ in range(config.copies):
            new = " ".join(rng.choice(neighbours[w]) if w in neighbours and rng.random() < config.replace_prob
                           else w for w in words)
            if new not in seen:
                seen.add(new)
                out.append((source, new))
    return out


def word_neighbours(embeddings: torch.Tensor, vocab: dict[str, int], words: set[str], k: int) -> dict[str, list[str]]:
    """{word: its k nearest whole words}, for the `words` that are one alphabetic word piece of `vocab`.

    embeddings: [V, D], the table `vocab` indexes. Neighbours are drawn from every alphabetic whole-word piece of
    at least two letters, so a rare word can become a common one.
    """
    pool = sorted(t for t, i in vocab.items() if t.isalpha() and len(t) > 1 and i < len(embeddings))
    ids = torch.tensor([vocab[t] for t in pool])
    table = neighbour_table(embeddings, ids, k)
    position = {t: n for n, t in enumerate(pool)}
    return {w: [pool[j] for j in table[position[w]].tolist()] for w in sorted(words) if w in position}


def augmented_sentences(
    sentences: list[str], embeddings: torch.Tensor, vocab: dict[str, int], config: AugmentConfig
) -> list[str]:
    """New sentences grown from the whole sentences among `sentences` (the student's training rows).

    embeddings: [V, D], the word-piece table `vocab` (token -> row) indexes; its nearest rows are the swaps.
    """
    return [new for _, new in augmented_with_sources(sentences, embeddings, vocab, config)]


def augmented_with_sources(
    sentences: list[str], embeddings: torch.Tensor, vocab: dict[str, int], config: AugmentConfig
) -> list[tuple[int, str]]:
    """`augmented_sentences`' sentences, in its order, each with the index into `sentences` of its source row."""
    index = whole_sentences(sentences, config.min_words)
    words = {w for i in index for w in sentences[i].split()}
    grown = augment_with_sources([sentences[i] for i in index],
                                 word_neighbours(embeddings, vocab, words, config.neighbours), config)
    return [(index[source], new) for source, new in grown]


def sentence_rows(sentences: list[str], labels: list[int] | None = None) -> datasets.Dataset:
    """Rows in SST-2's layout (`sentence`, `label`) for `tokenize`; labels default to 0 (unused by a forward)."""
    return datasets.Dataset.from_dict({"sentence": sentences, "label": labels or [0] * len(sentences)})
