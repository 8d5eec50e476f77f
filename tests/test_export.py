"""compression.export and `compress export` / `compress predict`: a variant taken out of the cache predicts as it
did inside, under onnxruntime + tokenizers alone; nothing already written is damaged.

The tiny BERT of conftest (both poolings), its classifier sharpened so that both labels occur.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from compression import export
from compression.artifacts import load_classifier, load_model, save_classifier, save_quantized
from compression.cli import EXIT_ERROR, main
from compression.export import export_variant, max_length, predict_texts, text_logits
from compression.quantize import Int8Config, quantize

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 2.0  # the random head's logits differ by ~0.001 between sentences; rescaled, by about this
SENTENCES = [
    "a good movie .",
    "not very funny , too slow",
    "The acting is BRILLIANT !",
    "dull",
    "an unknownword film",
    "charming , warm and fresh",
    "boring mess , awful script",
    "quite smart music but a weak ending",
    " ".join(["the movie is good but the plot is dull"] * 12),  # 120 words: truncated to max_length
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Saved:
    model: torch.nn.Module
    fp32: Path  # save_classifier folder
    int8: Path  # save_quantized folder
    fp32_out: Path  # its exports
    int8_out: Path


@pytest.fixture(scope="module")
def saved_all(tmp_path_factory, tiny_model_session, tiny_mean_model_session, tiny_tokenizer) -> dict[str, Saved]:
    out = {}
    for pooling, session_model in (("cls", tiny_model_session), ("mean", tiny_mean_model_session)):
        model = copy.deepcopy(session_model)
        with torch.no_grad():  # head centred on these sentences and scaled: both labels, clear margins
            logits = model(**tiny_tokenizer(SENTENCES, padding=True, truncation=True, max_length=64,
                                            return_tensors="pt")).logits
            centred = logits - logits.mean(0)
            scale = MARGIN / (centred[:, 1] - centred[:, 0]).abs().median()
            model.classifier.weight.mul_(scale)
            model.classifier.bias.copy_((model.classifier.bias - logits.mean(0)) * scale)
        # A tokenizer call leaves its truncation and padding in the saved tokenizer.json: the export must reset them.
        stale = copy.deepcopy(tiny_tokenizer)
        stale.backend_tokenizer.enable_truncation(max_length=8)
        stale.backend_tokenizer.enable_padding(length=80)
        root = tmp_path_factory.mktemp(f"export-{pooling}")
        save_classifier(model, stale, root / "fp32")
        (root / "int8").mkdir()
        save_quantized(quantize(copy.deepcopy(model), Int8Config(threads=1)), stale, root / "int8")
        out[pooling] = Saved(model, root / "fp32", root / "int8",
                             export_variant(root / "fp32", root / "out-fp32"),
                             export_variant(root / "int8", root / "out-int8"))
    return out


@pytest.fixture(params=["cls", "mean"])
def saved(request, saved_all) -> Saved:
    return saved_all[request.param]


def reference_predictions(folder: Path, sentences: list[str]) -> np.ndarray:
    """The loaded variant's labels, tokenized by the transformers tokenizer, batch 1 (the project's own path)."""
    import datasets

    from compression.data import tokenize
    from compression.measure import predict

    model, tokenizer = load_model(folder)
    ds = datasets.Dataset.from_dict({"sentence": sentences, "label": [0] * len(sentences)})
    ds = tokenize(ds, tokenizer, max_length(json.loads((folder / "config.json").read_text())))
    return predict(model, ds, tokenizer, batch_size=1)


def label_ids(predictions) -> list[int]:
    return [int(export.SST2_LABELS["1"] == label) for label, _ in predictions]


def test_int8_export_predicts_exactly_like_the_loaded_variant(saved):
    exported = predict_texts(saved.int8_out, SENTENCES)
    expected = reference_predictions(saved.int8, SENTENCES)
    assert label_ids(exported) == expected.tolist()
    assert set(expected.tolist()) == {0, 1}  # both labels occur, so equality says something


def test_int8_export_probabilities_are_the_variants(saved, tiny_tokenizer):
    model, _ = load_model(saved.int8)
    for (_, probability), text in zip(predict_texts(saved.int8_out, SENTENCES), SENTENCES):
        enc = tiny_tokenizer(text, truncation=True, max_length=64, return_tensors="pt")
        probs = model(**enc).logits.softmax(-1)[0]
        assert probability == pytest.approx(probs.max().item(), abs=1e-5)


def test_fp32_export_onnx_matches_torch(saved, tiny_tokenizer):
    onnx_logits = text_logits(saved.fp32_out, SENTENCES)
    for logits, text in zip(onnx_logits, SENTENCES):
        enc = tiny_tokenizer(text, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            expected = saved.model(**enc).logits[0].numpy()
        # ORT's fused kernels (LayerNorm, GELU, attention) differ from torch's by ~1e-6, which the rescaled
        # head (MARGIN) amplifies up to ~1e-4 on the [CLS] model
        np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3)
    assert label_ids(predict_texts(saved.fp32_out, SENTENCES)) == reference_predictions(saved.fp32, SENTENCES).tolist()


def test_fp32_export_keeps_the_save_pretrained_folder(saved, tiny_batch):
    model, tokenizer = load_classifier(saved.fp32_out)
    with torch.no_grad():
        assert torch.equal(model(**tiny_batch).logits, saved.model(**tiny_batch).logits)
    assert len(tokenizer) == tokenizer.vocab_size


def test_exported_files(saved_all):
    saved = saved_all["mean"]
    common = {"model.onnx", "tokenizer.json", "tokenizer_config.json", "config.json", "labels.json"}
    assert {p.name for p in saved.int8_out.iterdir()} == common | {"quantization.json"}
    assert {p.name for p in saved.fp32_out.iterdir()} == common | {"model.safetensors"}
    umask = os.umask(0)
    os.umask(umask)
    for out in (saved.int8_out, saved.fp32_out):  # ordinary files, whatever the cache's modes (safetensors: 0600)
        assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
            p.name: 0o666 & ~umask for p in out.iterdir()}
    for out in (saved.int8_out, saved.fp32_out):
        assert json.loads((out / "labels.json").read_text()) == {"0": "negative", "1": "positive"}
        assert json.loads((out / "config.json").read_text())["compression_pooling"] == "mean"
    assert not [p for p in saved.int8_out.parent.iterdir() if p.name.startswith(".")]  # no temporary folders


def test_exported_tokenizer_truncates_like_transformers(saved_all, tiny_tokenizer):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(saved_all["cls"].int8_out / "tokenizer.json"))
    settings = json.loads((saved_all["cls"].int8_out / "tokenizer.json").read_text())
    assert settings["truncation"]["max_length"] == 64 and settings["padding"] is None
    for text in SENTENCES:
        enc = tokenizer.encode(text)
        expected = tiny_tokenizer(text, truncation=True, max_length=64)
        assert enc.ids == expected["input_ids"]
        assert enc.type_ids == expected["token_type_ids"]
    assert len(tokenizer.encode(SENTENCES[-1]).ids) == 64


@pytest.mark.parametrize("config, expected", [
    ({"model_type": "bert", "max_position_embeddings": 512}, 128),
    ({"model_type": "bert", "max_position_embeddings": 64}, 64),
    ({"model_type": "mpnet", "max_position_embeddings": 514, "pad_token_id": 1}, 128),
    ({"model_type": "roberta", "max_position_embeddings": 66, "pad_token_id": 1}, 64),
    ({}, 128),
])
def test_max_length(config, expected):
    assert max_length(config) == expected


@pytest.mark.parametrize("config, expected", [
    ({"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}, {"0": "negative", "1": "positive"}),
    ({}, {"0": "negative", "1": "positive"}),
    ({"id2label": {"0": "bad", "1": "good"}}, {"0": "bad", "1": "good"}),
    ({"id2label": {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}, "num_labels": 3},
     {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}),
])
def test_labels_for(config, expected):
    assert export.labels_for(config) == expected


@pytest.mark.parametrize("kind, runs_under", [("bnb8", "bitsandbytes"), ("wo8", "this package")])
def test_bnb8_and_wo8_are_refused(tmp_path, saved_all, kind, runs_under):
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "config.json").write_text((saved_all["cls"].int8 / "config.json").read_text())
    (folder / "quantization.json").write_text(json.dumps({"backend": kind, "config": {}}))
    with pytest.raises(ValueError, match=rf"{kind}.*{runs_under}.*_int8") as err:
        export_variant(folder, tmp_path / "out")
    assert str(folder) in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]


@pytest.mark.parametrize("make", ["missing", "empty", "no-config"])
def test_not_a_variant_folder(tmp_path, make):
    folder = tmp_path / "variant"
    if make != "missing":
        folder.mkdir()
    if make == "no-config":
        (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(folder))):
        export_variant(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_empty_out_is_refused_untouched_then_overwritten(saved_all, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match=re.escape(str(out)) + ".*not empty"):
        export_variant(saved_all["cls"].int8, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert export_variant(saved_all["cls"].int8, out, overwrite=True) == out
    assert not (out / "mine.txt").exists() and (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder and the temporary one are gone


def test_empty_existing_out_is_filled(saved_all, tmp_path):
    (tmp_path / "out").mkdir()
    export_variant(saved_all["cls"].int8, tmp_path / "out")
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_out_that_is_a_file_is_refused(saved_all, tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ValueError, match="not a folder"):
        export_variant(saved_all["cls"].int8, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out").read_text() == "a file"


@pytest.mark.parametrize("depth", [1, 2])
def test_out_below_a_file_is_refused_naming_the_file(saved_all, tmp_path, depth):
    (tmp_path / "notes").write_text("a file")
    out = tmp_path.joinpath("notes", *["sub"] * depth)
    with pytest.raises(ValueError, match=re.escape(f"{out}: {tmp_path / 'notes'} is a file, not a folder")):
        export_variant(saved_all["cls"].int8, out)
    assert (tmp_path / "notes").read_text() == "a file" and [p.name for p in tmp_path.iterdir()] == ["notes"]


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_out_overlapping_the_variant_is_refused_even_with_overwrite(saved_all, where):
    source = saved_all["cls"].int8
    before = sorted(p.name for p in source.iterdir())
    out = {"same": source, "inside": source / "export", "parent": source.parent}[where]
    with pytest.raises(ValueError, match="variant folder"):
        export_variant(source, out, overwrite=True)
    assert sorted(p.name for p in source.iterdir()) == before


def test_failed_export_leaves_out_as_it_was(saved_all, tmp_path, monkeypatch):
    import compression.quant_onnx

    def broken(*_, **__):
        raise RuntimeError("export failed")

    monkeypatch.setattr(compression.quant_onnx, "export_onnx", broken)
    failure = r"cannot be exported \(RuntimeError: export failed\)"  # one line naming the folder, not a traceback
    with pytest.raises(ValueError, match=failure):
        export_variant(saved_all["cls"].fp32, tmp_path / "new")
    out = tmp_path / "old"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match=failure):
        export_variant(saved_all["cls"].fp32, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_predict_texts_on_a_folder_not_exported(saved_all):
    with pytest.raises(ValueError, match="not an exported folder"):
        predict_texts(saved_all["cls"].fp32, ["good"])  # a cache folder: no model.onnx, no labels.json


@pytest.mark.parametrize("labels, says", [
    ({"0": "negative"}, "class '1' has no entry"),
    ({"0": "negative", "1": 1}, "class '1' has 1, not a string"),
    ({"negative": 0, "positive": 1}, "class '0' has no entry"),
])
def test_predict_texts_refuses_labels_that_do_not_name_every_class(saved_all, tmp_path, labels, says):
    folder = tmp_path / "exported"
    shutil.copytree(saved_all["cls"].int8_out, folder)
    (folder / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder / 'labels.json'))}: {re.escape(says)}"):
        predict_texts(folder, ["good"])


def constant_logits_model(path: Path, logits: np.ndarray) -> None:
    """An ONNX model taking the exported inputs and giving `logits` whatever they are."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, [1, "T"]) for n in ("input_ids", "attention_mask")]
    value = numpy_helper.from_array(logits.astype(np.float32), "value")
    graph = helper.make_graph([helper.make_node("Constant", [], ["logits"], value=value)], "constant", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(logits.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


@pytest.mark.parametrize("logits, says", [
    (np.array([0.1, 0.2]), r"gives logits of shape \[2\]"),
    (np.zeros((1, 2, 2)), r"gives logits of shape \[1, 2, 2\]"),
    (np.zeros((1, 1)), r"gives logits of shape \[1, 1\]"),
    (np.array([[np.nan, 0.0]]), "gives logits that are not finite"),
    (np.array([[np.inf, 0.0]]), "gives logits that are not finite"),
])
def test_a_model_whose_logits_are_not_one_row_of_finite_scores_is_refused_by_predict_and_export(
        saved_all, tmp_path, logits, says):
    folder = tmp_path / "exported"
    shutil.copytree(saved_all["cls"].int8_out, folder)
    constant_logits_model(folder / "model.onnx", logits)
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder / 'model.onnx'))}: {says}"):
        predict_texts(folder, ["good"])
    with pytest.raises(ValueError, match="its export does not run: .*" + says):
        export_variant(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_variant_whose_labels_predict_would_refuse(saved_all, tmp_path):
    folder = tmp_path / "variant"
    shutil.copytree(saved_all["cls"].int8, folder)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "negative"}
    config.pop("label2id", None)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="its export does not run: .*labels.json: class '1' has no entry"):
        export_variant(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


NO_TORCH = ("\nimport sys\nloaded = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not loaded, loaded\n")


def test_predict_texts_imports_neither_torch_nor_transformers(saved_all):
    folder = saved_all["mean"].int8_out
    out = run_python(f"import json\nfrom compression.export import predict_texts\n"
                     f"print(json.dumps(predict_texts({str(folder)!r}, {SENTENCES!r})))" + NO_TORCH)
    assert [tuple(p) for p in json.loads(out)] == predict_texts(folder, SENTENCES)


def readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Take the result out", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_readme_snippet_runs_without_torch_and_agrees(saved_all, kind):
    folder = getattr(saved_all["mean"], f"{kind}_out")
    snippet = readme_snippet()
    assert 'd = "sentiment/"' in snippet and '"a gripping, beautifully acted film"' in snippet
    for text in ("a gripping, beautifully acted film", SENTENCES[1]):
        code = snippet.replace('"sentiment/"', repr(str(folder) + "/"))
        code = code.replace('"a gripping, beautifully acted film"', repr(text))
        label, probability = run_python(code + NO_TORCH).split()
        (expected,) = predict_texts(folder, [text])
        assert (label, float(probability)) == (expected[0], round(expected[1], 4))


# ---- the command line ----

def stderr_line(capsys) -> str:
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return line


@pytest.fixture
def results_json(tmp_path, saved_all) -> Path:
    rows = [{"name": "teacher", "folder": str(saved_all["cls"].fp32)},
            {"name": "teacher_int8", "folder": str(saved_all["cls"].int8)},
            {"name": "student_int8", "folder": str(tmp_path / "gone")},
            {"name": "student"}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"schema_version": 1, "profile": "smoke", "variants": rows}))
    return path


def test_cli_export_then_predict(capsys, tmp_path, results_json):
    out = tmp_path / "sentiment"
    assert main(["export", str(results_json), "teacher_int8", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: ")
    assert (out / "model.onnx").is_file()

    texts = ["a good movie .", "boring mess , awful script"]
    assert main(["predict", str(out), *texts]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line, text, (label, probability) in zip(lines, texts, predict_texts(out, texts)):
        assert re.fullmatch(r"(positive|negative)\t[01]\.\d{4}\t.+", line)
        assert line == f"{label}\t{probability:.4f}\t{text}"


def test_cli_export_from_a_cache_folder(capsys, tmp_path, saved_all):
    out = tmp_path / "sentiment"
    assert main(["export", "--folder", str(saved_all["mean"].fp32), "--out", str(out)]) == 0
    assert {"model.onnx", "model.safetensors", "labels.json"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("variant, named", [
    ("nope", ["results.json: no variant 'nope' (has: teacher, teacher_int8, student_int8, student)"]),
    ("student_int8", ["gone: the folder of 'student_int8' is no longer in the cache"]),
    ("student", ["results.json: variant 'student' has no 'folder'"]),  # a results.json from before export
])
def test_cli_export_bad_variant(capsys, tmp_path, results_json, variant, named):
    out = tmp_path / "sentiment"
    assert main(["export", str(results_json), variant, "--out", str(out)]) == EXIT_ERROR
    line = stderr_line(capsys)
    assert line.startswith("compress export: error: ")
    assert all(part in line for part in named), line
    assert not out.exists()


@pytest.mark.parametrize("junk", ["junk", 5, None])
def test_cli_export_refuses_a_row_that_is_not_an_object(capsys, tmp_path, results_json, junk):
    """A stray entry before the rows must not shift which folder a name picks (teacher_int8's would be exported
    as teacher), nor crash after it."""
    doc = json.loads(results_json.read_text())
    doc["variants"].insert(0, junk)
    results_json.write_text(json.dumps(doc))
    out = tmp_path / "sentiment"
    assert main(["export", str(results_json), "teacher", "--out", str(out)]) == EXIT_ERROR
    line = stderr_line(capsys)
    assert "key 'variants[0]' is not an object" in line and str(results_json) in line, line
    assert not out.exists()


def test_cli_export_missing_results(capsys, tmp_path):
    missing = tmp_path / "results.json"
    assert main(["export", str(missing), "teacher", "--out", str(tmp_path / "o")]) == EXIT_ERROR
    assert str(missing) in stderr_line(capsys)


@pytest.mark.parametrize("argv", [["--out", "o"], ["r.json", "--out", "o"], ["r.json", "v", "--folder", "f", "--out", "o"]])
def test_cli_export_needs_results_and_variant_or_folder(capsys, argv):
    assert main(["export", *argv]) == EXIT_ERROR
    assert stderr_line(capsys).startswith("compress export: error: ")


def test_cli_export_into_non_empty_out(capsys, tmp_path, results_json):
    out = tmp_path / "sentiment"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["export", str(results_json), "teacher_int8", "--out", str(out)]) == EXIT_ERROR
    line = stderr_line(capsys)
    assert str(out) in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert main(["export", str(results_json), "teacher_int8", "--out", str(out), "--overwrite"]) == 0
    assert (out / "model.onnx").is_file() and not (out / "mine.txt").exists()


def test_cli_predict_on_a_folder_not_exported(capsys, tmp_path):
    assert main(["predict", str(tmp_path), "good"]) == EXIT_ERROR
    line = stderr_line(capsys)
    assert line.startswith("compress predict: error: ") and str(tmp_path) in line


# --- damaged variants and outputs: one line naming the folder, nothing written ----------------------------------


def copy_variant(saved_all, kind: str, tmp_path) -> Path:
    import shutil

    folder = tmp_path / f"variant-{kind}"
    shutil.copytree(getattr(saved_all["cls"], kind), folder)
    return folder


@pytest.mark.parametrize("damage, says", [
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
     "its safetensors weights cannot be read"),
    (lambda f: [p.unlink() for p in f.iterdir() if p.name.startswith(("tokenizer", "vocab", "special"))],
     "no tokenizer"),  # else transformers builds a tokenizer of special tokens alone: every word [UNK]
    (lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                          "id2label": ["negative", "positive"]})),
     "cannot be loaded (AttributeError"),  # met deep in transformers: one line, not its traceback
    (lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                          "model_type": "evilnet", "auto_map": {
                                                              "AutoConfig": "evil.EvilConfig"}})),
     "asks for custom code (auto_map)"),  # refused without asking (trust_remote_code is never on)
    (lambda f: (f / "tokenizer.json").write_text("xx"),
     "cannot be loaded (JSONDecodeError"),  # tokenizers' own message names no file
])
def test_damaged_fp32_variant_is_one_error_and_nothing_written(saved_all, tmp_path, damage, says):
    folder = copy_variant(saved_all, "fp32", tmp_path)
    damage(folder)
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder))}.*{re.escape(says)}") as err:
        export_variant(folder, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_int8_variant_whose_onnx_does_not_load_is_refused_before_it_is_placed(saved_all, tmp_path):
    folder = copy_variant(saved_all, "int8", tmp_path)
    (folder / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder))}: its export does not run: .*onnxruntime"):
        export_variant(folder, tmp_path / "new" / "deeper" / "out")
    assert not (tmp_path / "new").exists()  # nor the folders made to hold it


@pytest.mark.parametrize("target", ["empty", "full"])
def test_out_that_is_a_symlink_is_refused_and_its_folder_untouched(saved_all, tmp_path, target):
    (tmp_path / target).mkdir()
    if target == "full":
        (tmp_path / target / "mine.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / target)
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'link'))}: is a symbolic link"):
        export_variant(saved_all["cls"].int8, tmp_path / "link", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target, "link"])
    assert [p.name for p in (tmp_path / target).iterdir()] == ([] if target == "empty" else ["mine.txt"])


def test_out_that_is_a_symlink_loop_is_refused(saved_all, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'a'))}: cannot be resolved"):
        export_variant(saved_all["cls"].int8, tmp_path / "a")


def test_predict_names_a_model_that_takes_other_inputs(saved_all, tmp_path):
    import shutil

    import onnx

    folder = tmp_path / "renamed"
    shutil.copytree(saved_all["cls"].int8_out, folder)
    model = onnx.load(folder / "model.onnx")
    old = model.graph.input[0].name
    model.graph.input[0].name = "pixels"
    for node in model.graph.node:
        node.input[:] = ["pixels" if name == old else name for name in node.input]
    onnx.save(model, folder / "model.onnx")
    with pytest.raises(ValueError, match="takes pixels.*an exported model takes input_ids"):
        predict_texts(folder, ["good"])


def test_predict_takes_text_that_was_not_utf8(saved_all):
    # a shell argument of Latin-1 bytes reaches Python with a surrogate escape, which tokenizers refuses
    ((label, probability),) = predict_texts(saved_all["cls"].int8_out, ["caf\udce9 good"])
    assert label in ("negative", "positive") and 0.5 <= probability <= 1.0


def test_one_string_is_not_read_as_a_list_of_characters(saved_all):
    with pytest.raises(ValueError, match="a list of texts, not one string"):
        predict_texts(saved_all["mean"].int8_out, "a good movie")
