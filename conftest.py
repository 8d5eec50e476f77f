"""Shared fixtures: a tiny random BERT classifier and tokenizer built in-process (nothing downloaded).

Modelled on transformers' `BertModelTester`: a config small enough that a forward pass takes a millisecond, with
dropout off so that outputs are deterministic. Session-scoped objects are copied per test by the function-scoped
fixtures, since pruning and quantization mutate models in place.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a an movie film story plot acting actors director script scenes ending music "
    "good great fun funny moving charming smart fresh brilliant beautiful warm "
    "bad dull boring flat tired stupid awful mess weak slow "
    "not very too quite really never ever , . ! ' s"
).split()
POSITIVE = {"good", "great", "fun", "funny", "moving", "charming", "smart", "fresh", "brilliant", "beautiful", "warm"}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped where none is available")
    config.addinivalue_line("markers", "slow: loads the real embedded model or trains on real data")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they cost ~15 ms per op."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


@pytest.fixture(scope="session")
def tiny_config(tiny_tokenizer):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
        type_vocab_size=2,
        num_labels=2,
    )


@pytest.fixture(scope="session")
def tiny_model_session(tiny_config):
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_config).eval()


@pytest.fixture
def tiny_model(tiny_model_session):
    """A fresh copy per test: verbs such as prune_heads_ and quantize_bnb8_ work in place."""
    return copy.deepcopy(tiny_model_session)


@pytest.fixture(scope="session")
def tiny_mean_model_session(tiny_config):
    import torch

    from compression.models import MeanPoolBertForSequenceClassification

    torch.manual_seed(0)
    return MeanPoolBertForSequenceClassification(tiny_config).eval()


@pytest.fixture(params=["cls", "mean"])
def any_tiny_model(request, tiny_model_session, tiny_mean_model_session):
    """A fresh copy of the tiny classifier with each pooling: [CLS] pooler, and masked mean."""
    return copy.deepcopy(tiny_model_session if request.param == "cls" else tiny_mean_model_session)


@pytest.fixture(scope="session")
def tiny_batch(tiny_tokenizer):
    sentences = ["a good movie .", "not very funny , too slow", "the acting is brilliant !", "dull"]
    return dict(tiny_tokenizer(sentences, padding=True, return_tensors="pt"))


NAMES = ["teacher", "teacher_int8", "teacher_bnb8", "student", "student_int8", "student_bnb8",
         "pruned_student", "pruned_student_int8", "pruned_student_bnb8",
         "slim_student", "slim_student_int8", "slim_student_bnb8"]  # every variant, in table order


def tiny_profile(**changes):
    """A whole job in seconds on the tiny models: 64 rows per stage, a 2-layer student, 4 heads removed, then half
    its FFN neurons, its vocabulary cut to the training words and its word embedding factored at rank 8."""
    from compression.distill import DistillConfig
    from compression.low_rank import LowRankConfig
    from compression.profiles import Profile
    from compression.prune import PruneConfig
    from compression.prune_ffn import FfnPruneConfig
    from compression.train import TrainConfig

    train = TrainConfig(learning_rate=1e-3, epochs=1.0, batch_size=16, max_rows=64, bf16=False)
    settings = dict(
        teacher_base=None, teacher=train, distill=DistillConfig(num_layers=2), student=train,
        prune=PruneConfig(remove=4, importance_batches=2, batch_size=16),
        ffn=FfnPruneConfig(remove=0.5, importance_batches=2, batch_size=16), low_rank=LowRankConfig(8),
        recovery=train, low_rank_recovery=train,
        latency_examples=4, warmup=1,
    )
    return Profile("tiny", **(settings | changes))


def make_sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Synthetic SST-2-like rows: the label is whether positive words outnumber the others."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS[:-6]) for _ in range(rng.randint(2, 12))]
        pos = sum(w in POSITIVE for w in words)
        rows.append((" ".join(words), int(pos * 2 > sum(w not in POSITIVE for w in words[:4]))))
    return rows


def informative_(model, tokenizer) -> list[str]:
    """Make a tiny random classifier's logits tell sentences apart, as a trained one's do; in place.

    At init (weights of std 0.02) the [CLS] model gives every sentence logits of about 0.01 that differ by 1e-4,
    below one 8-bit activation step: int8 keeps nothing of what tells sentences apart, and a zero or constant
    output passes any comparison with them. Encoder weights of std 0.1 (x5) make the sentences' features differ;
    the classifier then reads their main direction of variation, centred on the median sentence, so that the
    logits are of order 4 and both classes occur. Returns the 24 sentences that set the direction.
    """
    import torch

    sentences = [s for s, _ in make_sentences(24, seed=4)]
    features = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embeddings" not in name and not name.startswith("classifier"):
                p.mul_(5.0)
        hook = model.classifier.register_forward_hook(lambda m, args, out: features.append(args[0]))
        model(**tokenizer(sentences, padding=True, return_tensors="pt"))
        hook.remove()
        f = features[0]  # [N, H]
        direction = torch.linalg.svd(f - f.mean(0), full_matrices=False).Vh[0]  # [H]
        direction *= 4.0 / (f @ direction).std()
        middle = (f @ direction).median()
        model.classifier.weight.copy_(torch.stack([-direction, direction]) / 2)  # logit 1 - logit 0 = f . direction
        model.classifier.bias.copy_(torch.stack([middle, -middle]) / 2)
    return sentences


def write_tsv(path: Path, rows, header: str = "sentence\tlabel") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(f"{s}\t{label}\n" for s, label in rows), encoding="utf-8")
    return path


@pytest.fixture
def sst2_dir(tmp_path) -> Path:
    """A small GLUE-layout SST-2 folder written for one test."""
    folder = tmp_path / "sst2"
    write_tsv(folder / "train.tsv", make_sentences(96, seed=1))
    write_tsv(folder / "dev.tsv", make_sentences(32, seed=2))
    return folder


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache read offline (no hub here or in CI), and a function that adds a snapshot to it:
    `fake_hub(repo_id, files_from, commit)` copies the folder `files_from` in as huggingface_hub lays a download
    out, with `main` at `commit`, and returns the snapshot folder."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def add(repo_id: str, files_from: Path, commit: str = "0" * 40) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / commit
        shutil.copytree(files_from, snapshot)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return snapshot.resolve()

    return add


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, tiny_model_session, tiny_tokenizer) -> Path:
    """The tiny model saved as a base-model folder (for --base and the pipeline)."""
    folder = tmp_path_factory.mktemp("tiny-base")
    tiny_model_session.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_distilbert_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny non-BERT base folder (DistilBERT), for the paths that need a BERT model."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-distilbert")
    config = DistilBertConfig(vocab_size=len(tiny_tokenizer), dim=16, n_layers=1, n_heads=2, hidden_dim=20,
                              max_position_embeddings=32)
    DistilBertForSequenceClassification(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_mpnet_tokenizer():
    """An MPNet tokenizer over another vocabulary than the tiny BERT's (other ids, other special tokens)."""
    from transformers import MPNetTokenizer

    vocab = ["<s>", "<pad>", "</s>", "[UNK]", *reversed(WORDS), "<mask>"]
    return MPNetTokenizer(vocab={w: i for i, w in enumerate(vocab)}, unk_token="[UNK]")


@pytest.fixture(scope="session")
def tiny_mpnet_config(tiny_mpnet_tokenizer):
    from transformers import MPNetConfig

    return MPNetConfig(
        vocab_size=len(tiny_mpnet_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        # 32 buckets: MPNetEncoder computes the bias with its default of 32, whatever the config says
        max_position_embeddings=66, relative_attention_num_buckets=32, num_labels=2, pad_token_id=1,
    )


@pytest.fixture(scope="session")
def tiny_mpnet_dir(tmp_path_factory, tiny_mpnet_config, tiny_mpnet_tokenizer) -> Path:
    """A tiny random MPNet base folder (another family and vocabulary than the tiny BERT)."""
    import torch
    from transformers import MPNetForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-mpnet")
    torch.manual_seed(0)
    MPNetForSequenceClassification(tiny_mpnet_config).save_pretrained(folder)
    tiny_mpnet_tokenizer.save_pretrained(folder)
    return folder


# --- tiny RoBERTa and DistilBERT (tests/test_families.py) -------------------------------------------------------


def bpe_vocab_and_merges(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary spelling each word (with and without its leading-space marker Ġ) by merges."""
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])}
    merges: list[tuple[str, str]] = []
    for word in words:
        for piece in (word, "\u0120" + word):
            for ch in piece:
                vocab.setdefault(ch, len(vocab))
            merged = piece[0]
            for ch in piece[1:]:
                if (merged, ch) not in merges:
                    merges.append((merged, ch))
                merged += ch
                vocab.setdefault(merged, len(vocab))
    return vocab, merges


@pytest.fixture(scope="session")
def tiny_roberta_tokenizer():
    from transformers import RobertaTokenizer

    vocab, merges = bpe_vocab_and_merges(WORDS)
    return RobertaTokenizer(vocab=vocab, merges=merges)


@pytest.fixture(scope="session")
def tiny_roberta_config(tiny_roberta_tokenizer):
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=len(tiny_roberta_tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        num_labels=2,
    )


@pytest.fixture(scope="session")
def tiny_distilbert_tokenizer():
    """DistilBERT's WordPiece tokenizer (no token_type_ids) over the tiny BERT's vocabulary."""
    from transformers import DistilBertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return DistilBertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


@pytest.fixture(scope="session")
def tiny_distilbert_config(tiny_distilbert_tokenizer):
    from transformers import DistilBertConfig

    return DistilBertConfig(
        vocab_size=len(tiny_distilbert_tokenizer), dim=32, n_layers=3, n_heads=4, hidden_dim=37, dropout=0.0,
        attention_dropout=0.0, seq_classif_dropout=0.0, max_position_embeddings=64, num_labels=2,
    )


def save_base(folder: Path, config, tokenizer) -> Path:
    """A random [CLS] classifier of `config` and its tokenizer saved as a base-model folder."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory, tiny_roberta_config, tiny_roberta_tokenizer) -> Path:
    return save_base(tmp_path_factory.mktemp("tiny-roberta"), tiny_roberta_config, tiny_roberta_tokenizer)


@pytest.fixture(scope="session")
def tiny_distilbert_base_dir(tmp_path_factory, tiny_distilbert_config, tiny_distilbert_tokenizer) -> Path:
    """A tiny DistilBERT base with its own tokenizer (`tiny_distilbert_dir` is a 1-layer one with BERT's)."""
    return save_base(tmp_path_factory.mktemp("tiny-distilbert-base"), tiny_distilbert_config,
                     tiny_distilbert_tokenizer)


# --- a tiny classifier of each family ----------------------------------------------------------------------

FAMILY_FIXTURES = {  # family -> (config fixture, tokenizer fixture)
    "bert": ("tiny_config", "tiny_tokenizer"),
    "roberta": ("tiny_roberta_config", "tiny_roberta_tokenizer"),
    "mpnet": ("tiny_mpnet_config", "tiny_mpnet_tokenizer"),
    "distilbert": ("tiny_distilbert_config", "tiny_distilbert_tokenizer"),
}


def tiny_classifier(request, family: str, pooling: str = "mean"):
    """(a seeded classifier of the family's tiny config, its tokenizer). Initialised 10x wider than the default,
    so that logits differ visibly between sentences and a wrong embedding row cannot pass as rounding."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    from compression.models import mean_pool_class

    config_name, tokenizer_name = FAMILY_FIXTURES[family]
    config = copy.deepcopy(request.getfixturevalue(config_name))
    config.initializer_range = 0.2
    torch.manual_seed(0)
    if pooling == "cls":
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = mean_pool_class(config.model_type)(config)
    return model.eval(), request.getfixturevalue(tokenizer_name)
