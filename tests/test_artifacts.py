"""compression.artifacts: saving and loading fp32 classifiers, and sizing saved weights."""

from __future__ import annotations

import pytest
import torch

from compression.artifacts import MB, load_classifier, save_classifier, size_mb
from compression.models import count_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_save_and_load_classifier_round_trip(any_tiny_model, tiny_tokenizer, tiny_batch, tmp_path):
    folder = tmp_path / "clf"
    save_classifier(any_tiny_model, tiny_tokenizer, folder)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    loaded, tokenizer = load_classifier(folder)
    assert not loaded.training
    with torch.no_grad():
        expected = any_tiny_model(**tiny_batch).logits
        got = loaded(**tiny_batch).logits
    assert torch.equal(expected, got)
    assert tokenizer("a good movie .")["input_ids"] == tiny_tokenizer("a good movie .")["input_ids"]
    assert count_parameters(loaded) == count_parameters(any_tiny_model)


# --- size_mb -----------------------------------------------------------------------------------------------


def test_size_mb_matches_safetensors_file(tiny_model, tiny_tokenizer, tmp_path):
    folder = tmp_path / "clf"
    save_classifier(tiny_model, tiny_tokenizer, folder)
    weights = folder / "model.safetensors"
    assert size_mb(folder) == pytest.approx(weights.stat().st_size / 2**20, rel=1e-12)
    assert MB == 2**20
    # at least 4 bytes per fp32 parameter, plus a small header (and buffers)
    fp32_bytes = count_parameters(tiny_model) * 4
    assert fp32_bytes / 2**20 <= size_mb(folder) <= (fp32_bytes + 64 * 1024) / 2**20


def test_size_mb_counts_every_weight_file(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "model.onnx").write_bytes(b"\0" * 300)
    (tmp_path / "model.onnx.data").write_bytes(b"\0" * 2000)
    (tmp_path / "config.json").write_bytes(b"\0" * 5000)  # not a weight file
    assert size_mb(tmp_path) == pytest.approx(3300 / 2**20)


def test_size_mb_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weight file") as err:
        size_mb(tmp_path)
    assert str(tmp_path) in str(err.value)




def test_each_save_refuses_the_other_kind(tiny_model, tiny_tokenizer, tmp_path):
    import copy

    from compression.artifacts import save_quantized
    from compression.quantize import Bnb8Config, quantize

    with pytest.raises(ValueError, match="use save_classifier"):
        save_quantized(tiny_model, tiny_tokenizer, tmp_path / "q")
    with pytest.raises(ValueError, match="save_quantized writes quantized models.*bnb8-quantized"):  # its codes would be saved as weights
        save_classifier(quantize(copy.deepcopy(tiny_model), Bnb8Config()), tiny_tokenizer, tmp_path / "f")
    assert not (tmp_path / "q").exists() and not (tmp_path / "f").exists()
