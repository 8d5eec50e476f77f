"""Take a variant out of the cache: a folder that runs under onnxruntime + tokenizers alone, and its predictor.

An exported folder holds `model.onnx` (logits from input_ids, attention_mask[, token_type_ids]), `tokenizer.json`
(truncation to `max_length` tokens set inside it), `config.json` and `labels.json` ({"0": "negative", ...}).
An fp32 variant also keeps its `save_pretrained` files (config + safetensors + tokenizer); its `model.onnx` is
there because a mean-pooled or pruned model cannot be rebuilt by plain transformers. A bnb8 variant is
refused: LLM.int8 runs only under bitsandbytes and this package.

This module imports neither torch nor transformers at import time, and `predict_texts` never does, so a
deployment can run the same code path as the test that checks it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from compression.schema import one_line, read_json

MAX_LENGTH = 128  # tokens per text, as every variant was trained and measured (TrainConfig.max_length)
ONNX_FILE = "model.onnx"  # = compression.artifacts.ONNX_FILE, not imported from there: that module loads torch
QUANT_FILE = "quantization.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.json"
SST2_LABELS = {"0": "negative", "1": "positive"}
# RoBERTa and MPNet number positions from pad_token_id + 1, so that many fewer tokens fit.
OFFSET_POSITIONS = ("roberta", "mpnet", "xlm-roberta", "camembert")


def variant_kind(folder: Path) -> str:
    """"fp32", "int8", "bnb8" or "wo8" for a saved variant folder; ValueError naming it if it is none of them."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"{folder}: not a saved variant (no {CONFIG_FILE})")
    if not (folder / QUANT_FILE).is_file():
        if not (folder / WEIGHTS_FILE).is_file():
            raise ValueError(f"{folder}: not a saved variant (no {WEIGHTS_FILE} or {QUANT_FILE})")
        return "fp32"
    backend = read_json(folder / QUANT_FILE).get("backend")
    if backend not in ("int8", "bnb8", "wo8"):
        raise ValueError(f"{folder / QUANT_FILE}: unknown backend {backend!r}")
    return backend


def max_length(config: dict) -> int:
    """Tokens per text: MAX_LENGTH, or fewer where the model has fewer positions."""
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int):
        return MAX_LENGTH
    if config.get("model_type") in OFFSET_POSITIONS:
        pad = config.get("pad_token_id")
        positions -= (1 if pad is None else int(pad)) + 1
    return min(MAX_LENGTH, positions)


def labels_for(config: dict) -> dict[str, str]:
    """Label names by class index: config's id2label when it names them, else SST-2's for a binary model."""
    id2label = {str(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    generic = all(v == f"LABEL_{k}" for k, v in id2label.items())  # transformers' placeholders
    if generic and len(id2label) in (0, 2) and config.get("num_labels", 2) == 2:
        return dict(SST2_LABELS)
    return id2label


def export_variant(folder: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the saved variant in `folder` to `out` (see the module docstring) and return `out`.

    Built in a temporary folder beside `out` and renamed into place, so `out` is whole or untouched. An existing
    non-empty `out` is replaced only with `overwrite`.
    """
    folder, out = Path(folder), Path(out)
    kind = variant_kind(folder)
    if kind in ("bnb8", "wo8"):
        runs_under = "bitsandbytes and this package" if kind == "bnb8" else "this package (PyTorch int8 weights)"
        raise ValueError(f"{folder}: a {kind} variant runs only under {runs_under}; "
                         "export its _int8 (fast on CPU) or fp32 variant instead")
    _check_out(folder, out, overwrite)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    placed = False
    try:
        try:
            _build(folder, work, kind)
        except Exception as err:  # a malformed config or tokenizer, met deep in transformers or onnxruntime
            if isinstance(err, (ValueError, OSError)) and str(folder) in str(err):
                raise  # names what is wrong already
            raise ValueError(f"{folder}: cannot be exported ({type(err).__name__}: {one_line(err, 300)})") from None
        try:  # what predict will do, before anything is put in place
            predict_texts(work, ["a sentence to check the exported folder runs"])
        except ValueError as err:
            raise ValueError(f"{folder}: its export does not run: "
                             f"{str(err).replace(str(work), 'the exported folder')}") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(work, 0o777 & ~umask)  # mkdtemp makes 0700; an export is an ordinary folder
        for file in work.iterdir():  # and ordinary files (copy2 keeps a cache file's 0600)
            os.chmod(file, 0o666 & ~umask)
        _place(work, out, overwrite)
        placed = True
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
        for parent in made if not placed else ():  # a refused export leaves no folders behind it either
            try:
                parent.rmdir()
            except OSError:
                break
    return out


def _check_out(folder: Path, out: Path, overwrite: bool) -> None:
    """ValueError if writing `out` could damage the variant or a non-empty folder the caller did not give up."""
    try:
        src, dst = folder.resolve(strict=True), out.resolve()
    except RuntimeError as err:  # a symlink loop (an OSError from Python 3.13)
        raise ValueError(f"{out}: cannot be resolved ({err})") from None
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise ValueError(f"{out}: is, holds or is inside the variant folder {folder}; export somewhere else")
    if out.is_symlink():  # renaming into place would replace the link, not fill the folder it points to
        raise ValueError(f"{out}: is a symbolic link; give the folder it points to")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    above = next(p for p in out.absolute().parents if os.path.lexists(p))
    if not above.is_dir():  # mkdir would say only "File exists"
        raise ValueError(f"{out}: {above} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: exists and is not empty (--overwrite replaces it)")


def _build(folder: Path, work: Path, kind: str) -> None:
    """Fill `work` with the deployable files of an fp32 or int8 variant."""
    from transformers import AutoTokenizer  # export needs it; predicting from the result does not

    from compression.models import check_model_folder

    check_model_folder(folder)
    config = read_json(folder / CONFIG_FILE)
    shutil.copy2(folder / CONFIG_FILE, work / CONFIG_FILE)
    if kind == "int8":
        shutil.copy2(folder / ONNX_FILE, work / ONNX_FILE)
        shutil.copy2(folder / QUANT_FILE, work / QUANT_FILE)  # how it was quantized; lets load_model read it
    else:
        from compression.artifacts import load_classifier
        from compression.quant_onnx import export_onnx

        shutil.copy2(folder / WEIGHTS_FILE, work / WEIGHTS_FILE)
        model, _ = load_classifier(folder)
        export_onnx(model, work / ONNX_FILE)
    # Saved through transformers so that tokenizer.json exists even where the cache holds only slow files.
    AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False).save_pretrained(work)
    if not (work / TOKENIZER_FILE).is_file():
        raise ValueError(f"{folder}: its tokenizer has no {TOKENIZER_FILE} form (not a `tokenizers` tokenizer)")
    _set_truncation(work / TOKENIZER_FILE, max_length(config))
    (work / LABELS_FILE).write_text(json.dumps(labels_for(config), indent=1) + "\n")


def _set_truncation(path: Path, length: int) -> None:
    """Make `Tokenizer.from_file(path).encode(text)` truncate to `length` tokens and never pad."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=length)
    tokenizer.no_padding()  # batch 1: padding would only add masked tokens
    tokenizer.save(str(path))


def _place(work: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished `work` to `out`; an old `out` is removed only once the new one is in place."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(work, out)
        return
    if not overwrite:  # appeared since _check_out
        raise ValueError(f"{out}: exists and is not empty (--overwrite replaces it)")
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(work, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def predict_texts(folder: str | os.PathLike, texts: Sequence[str]) -> list[tuple[str, float]]:
    """(label, probability of that label) per text, one text per call as deployed: onnxruntime + tokenizers only."""
    import numpy as np

    folder = Path(folder)
    if not (folder / LABELS_FILE).is_file():
        raise ValueError(f"{folder}: not an exported folder (no {LABELS_FILE}; make one with compress export)")
    labels = read_json(folder / LABELS_FILE)
    results = []
    for logits in text_logits(folder, texts):
        _check_labels(folder / LABELS_FILE, labels, len(logits))
        shifted = np.exp(logits.astype(np.float64) - logits.max())
        probs = shifted / shifted.sum()
        best = int(probs.argmax())
        results.append((labels[str(best)], float(probs[best])))
    return results


def _check_labels(path: Path, labels: dict, classes: int) -> None:
    """ValueError naming `path` unless it names every one of the model's `classes` ("0", "1", ...) by a string:
    a label left out would otherwise be printed as its bare class number."""
    for key in map(str, range(classes)):
        if not isinstance(labels.get(key), str):
            got = "no entry" if key not in labels else f"{labels[key]!r}, not a string"
            raise ValueError(f"{path}: class {key!r} has {got} (the model gives {classes} classes: "
                             f"{{\"0\": \"negative\", \"1\": \"positive\"}} for SST-2)")


def text_logits(folder: str | os.PathLike, texts: Sequence[str]) -> list:
    """The exported model's logits [C] for each text, run at batch 1 (onnxruntime + tokenizers only)."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    folder = Path(folder)
    for name in (ONNX_FILE, TOKENIZER_FILE):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: not an exported folder (no {name}; make one with compress export)")
    try:  # both raise their own exception types; name the file instead of a traceback
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as err:
        raise ValueError(f"{folder / TOKENIZER_FILE}: tokenizers cannot read it ({err})") from None
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # failures are raised, and reported once, below; not also logged
        session = ort.InferenceSession(str(folder / ONNX_FILE), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ValueError(f"{folder / ONNX_FILE}: onnxruntime cannot load it ({err})") from None
    names = [i.name for i in session.get_inputs()]
    known = ("input_ids", "attention_mask", "token_type_ids")
    if not set(names) <= set(known) or "logits" not in [o.name for o in session.get_outputs()]:
        raise ValueError(f"{folder / ONNX_FILE}: takes {', '.join(names)} and gives "
                         f"{', '.join(o.name for o in session.get_outputs())}; an exported model takes "
                         f"{', '.join(known)} (some of them) and gives logits")
    if isinstance(texts, str):  # would be read a character at a time
        raise ValueError(f"give a list of texts, not one string ({texts[:40]!r})")
    out = []
    for text in texts:
        # a command-line argument that was not UTF-8 arrives with surrogate escapes, which tokenizers refuses
        enc = tokenizer.encode(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        given = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.type_ids}
        try:
            (logits,) = session.run(["logits"], {n: np.array([given[n]], dtype=np.int64) for n in names})
        except Exception as err:  # e.g. token ids past the model's embedding table: tokenizer and model disagree
            raise ValueError(f"{folder}: onnxruntime failed on {text[:40]!r} ({one_line(err, 300)})") from None
        if logits.ndim != 2 or logits.shape[0] != 1 or logits.shape[1] < 2:
            raise ValueError(f"{folder / ONNX_FILE}: gives logits of shape {list(logits.shape)} for one text; an "
                             "exported classifier gives [1, classes], classes >= 2")
        if not np.isfinite(logits).all():
            raise ValueError(f"{folder / ONNX_FILE}: gives logits that are not finite ({logits[0].tolist()}) for "
                             f"{text[:40]!r}")
        out.append(logits[0])
    return out
