"""The results table (printed and results.md), results.json and the Pareto plot, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# BERT-base-uncased on SST-2, Colab T4 GPU: the table this project reproduces and beats.
# (name, parameters, size MB, val acc %, latency ms)
REFERENCE = (
    ("bert_sst2_baseline", 109_483_778, 418.58, 92.55, 9.92),
    ("bert_sst2_baseline_quantized", 109_483_778, 209.75, 92.55, 9.63),
    ("bert_sst2_student", 66_955_010, 256.33, 91.51, 4.89),
    ("bert_sst2_student_quantized", 66_955_010, 128.62, 91.51, 4.75),
    ("head_pruned_student", 59_870_210, 229.31, 89.79, 4.26),
    ("head_pruned_student_quantized", 59_870_210, 115.11, 89.79, 4.17),
)


def table(variants: list[dict]) -> str:
    """Markdown table in the reference table's columns, plus p90, end-to-end latency and the backend.

    Accuracy is at batch 1, one sentence per call (as deployed, and as the latency is timed); where the
    length-sorted batches of 64 score differently, that figure follows in brackets.
    """
    lines = [
        "| # | Parameters | Size (MB) | Val Acc (%) | Latency (ms) | p90 (ms) | tokenize + forward (ms) | Model | Backend |",
        "|--:|--:|--:|--:|--:|--:|--:|:--|:--|",
    ]
    for i, v in enumerate(variants, start=1):
        acc = f"{v['val_accuracy']:.2f}"
        if v.get("val_accuracy_batched") is not None:
            acc += f" ({v['val_accuracy_batched']:.2f} batched)"
        e2e = f"{v['e2e_latency_ms']['median']:.2f}" if v.get("e2e_latency_ms") else "-"
        lines.append(
            f"| {i} | {v['parameters']:,} | {v['size_mb']:.2f} | {acc} | "
            f"{v['latency_ms']['median']:.2f} | {v['latency_ms']['p90']:.2f} | {e2e} | {v['name']} | {v['backend']} |"
        )
    return "\n".join(lines)


KEPT_FIELDS = (("heads", "heads_per_layer"), ("FFN neurons", "neurons_per_layer"))  # (what, results row key)


def kept_lines(variants: list[dict]) -> list[str]:
    """One line per pruned structure, naming the first variant with it: what it kept per encoder layer. (In table
    order that is the fp32 model; its 8-bit variants keep the same structure and are not repeated.)"""
    lines: dict[str, str] = {}
    for v in variants:
        parts = [f"{what} {', '.join(map(str, v[field]))} ({sum(v[field]):,} in all)"
                 for what, field in KEPT_FIELDS if v.get(field)]
        if v.get("tokens_kept"):
            parts.append(f"vocabulary {v['tokens_kept']:,} of {v['tokens_before']:,} tokens")
        kept = "; ".join(parts)
        if kept and kept not in lines:
            lines[kept] = f"- {v['name']}: {kept}"
    return list(lines.values())


def markdown(results: dict) -> str:
    env = results["environment"]
    where = env.get("gpu") or f"{env['cpu']}, {env['threads']} threads"
    kept = kept_lines(results["variants"])
    pruned = "\nKept by pruning, per encoder layer (8-bit variants as their fp32 model):\n\n" + "\n".join(kept) + "\n"
    return (
        f"# Results ({results['profile']} profile)\n\n"
        f"Teacher: {results.get('teacher') or results['base']}. Student: {results.get('student_base') or '-'}. "
        f"Data: {results['data']}. Measured on {where}; latency is per example at batch size 1 (median and p90 over "
        f"validation sentences; the model alone, and tokenize + forward), accuracy at batch 1 as deployed, sizes "
        f"are MiB of the saved weights.\n\n"
        f"{table(results['variants'])}\n"
        f"{pruned if kept else ''}"
    )


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so `path` is never half-written. A symlink is
    written through (the file it names is replaced, the link stays); a file's permission problem names `path`."""
    if path.is_symlink():
        try:
            path = path.resolve()
        except RuntimeError as err:  # a symlink loop (an OSError from Python 3.13)
            raise ValueError(f"{path}: cannot be resolved ({err})") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:  # name the file asked for, not a temporary one or a parent
        raise ValueError(f"{path}: cannot be written ({err.strerror or err})") from None
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as err:  # a full disk, a quota: name the file, which is left as it was
            raise ValueError(f"{path}: cannot be written ({err.strerror or err})") from None
        try:  # a file replaced keeps its mode (a private baselines.json stays private)
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # mkstemp makes 0600; results are ordinary files
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


RESULT_FILES = ("results.json", "results.md", "pareto.png")  # what `write_results` writes into --out


def write_results(results: dict, out: Path) -> list[Path]:
    """results.json, results.md and pareto.png into `out`; returns the paths written."""
    written = []
    json_path, md_path, png_path = (out / name for name in RESULT_FILES)
    write_atomic(json_path, (json.dumps(results, indent=2) + "\n").encode())
    write_atomic(md_path, markdown(results).encode())
    write_atomic(png_path, pareto_png(results["variants"]))
    written += [json_path, md_path, png_path]
    return written


def pareto_png(variants: list[dict]) -> bytes:
    """Two panels: accuracy vs latency (this run) and accuracy vs size (this run beside the reference table)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    xs = [v["latency_ms"]["median"] for v in variants]
    ys = [v["val_accuracy"] for v in variants]
    left.scatter(xs, ys, color="tab:blue", label="this run")
    for i, (v, x, y) in enumerate(zip(variants, xs, ys)):
        left.annotate(v["name"], (x, y), textcoords="offset points", xytext=(4, 3 - 9 * (i % 3)), fontsize=7)
    left.set_xlabel("latency per example, batch 1 (ms, median)")
    left.set_ylabel("SST-2 validation accuracy (%)")
    left.set_title("Accuracy against latency (this run)")
    left.grid(alpha=0.3)
    left.legend(loc="lower right")

    sizes = [v["size_mb"] for v in variants]
    right.scatter(sizes, ys, color="tab:blue", label="this run")
    for i, (v, x, y) in enumerate(zip(variants, sizes, ys)):
        right.annotate(v["name"], (x, y), textcoords="offset points", xytext=(4, 3 - 9 * (i % 3)), fontsize=7)
    ref_sizes = [r[2] for r in REFERENCE]
    ref_acc = [r[3] for r in REFERENCE]
    right.scatter(ref_sizes, ref_acc, color="tab:orange", marker="s", label="reference (BERT-base, T4)")
    for i, r in enumerate(REFERENCE):
        right.annotate(r[0], (r[2], r[3]), textcoords="offset points", xytext=(-60, 6 - 12 * (i % 2)), fontsize=7,
                       color="tab:orange")
    right.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    right.xaxis.set_major_locator(FixedLocator([5, 10, 20, 50, 100, 200, 500]))
    right.xaxis.set_major_formatter(ScalarFormatter())
    right.xaxis.set_minor_formatter(NullFormatter())
    right.set_xlabel("size on disk (MB, log scale)")
    right.set_ylabel("SST-2 validation accuracy (%)")
    right.set_title("Accuracy against size")
    right.grid(alpha=0.3, which="both")
    right.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
