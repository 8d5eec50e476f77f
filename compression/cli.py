"""`compress`: run the compression job, gate a run against baselines, accept a run as the new baselines.

    compress run [--profile full|smoke] [--base ID_OR_DIR] [--pooling mean|cls] [--data DIR] [--out results/]
    compress check RESULTS [--baselines baselines.json]
    compress baselines --accept RESULTS [RESULTS ...] [--baselines baselines.json]
    compress export (RESULTS VARIANT | --folder CACHE_FOLDER) --out DIR [--overwrite]
    compress predict DIR TEXT [TEXT ...]

Bad input is one line on stderr and exit 2; a gate breach is exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

EXIT_BREACH = 1
EXIT_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compress", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log every detail (default: stages only)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train or load teacher, student and pruned student; quantize; measure")
    run.add_argument("--profile", default="full", choices=["full", "minilm", "smoke"],
                     help="full: MPNet-base teacher -> MiniLM-L6 student (default; needs the [mpnet] extra); "
                          "minilm: MiniLM-L6 teacher -> 3-layer student; smoke: minutes, on a slice of train")
    run.add_argument("--base", default=None,
                     help="the teacher's base: all-mpnet-base-v2 or all-MiniLM-L6-v2 (embedded), a Hugging Face "
                          "id or a local folder (default: the profile's)")
    run.add_argument("--data", default=None,
                     help="SST-2 folder in GLUE layout (default: $SST2_DIR, else GLUE from the hub)")
    run.add_argument("--pooling", default=None, choices=["cls", "mean"],
                     help="classifier input: masked mean of the tokens (profiles' default; BERT bases) or [CLS]")
    run.add_argument("--out", default="results", type=Path, help="where results.{md,json} and pareto.png go")
    run.add_argument("--cache", default=None, type=Path,
                     help="artifact cache (default: $COMPRESSION_CACHE or ~/.cache/model-compression)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="where fp32 and bnb8 models train and run (int8 always runs on CPU)")
    run.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")

    check = sub.add_parser("check", help="gate a results.json against baselines; exit 1 on any breach")
    check.add_argument("results", type=Path)
    check.add_argument("--baselines", type=Path, default=Path("baselines.json"))

    base = sub.add_parser("baselines", help="rewrite baselines from a run")
    base.add_argument("--accept", type=Path, required=True, nargs="+", metavar="RESULTS",
                      help="results.json of one or more runs (latency ratios: their median)")
    base.add_argument("--baselines", type=Path, default=Path("baselines.json"))
    _add_export_parsers(sub)
    return parser


def _add_export_parsers(sub) -> None:
    """`export` and `predict`: take a variant out of the cache, and run what was taken out."""
    export = sub.add_parser("export", help="write a variant to a folder that runs under onnxruntime + tokenizers")
    export.add_argument("results", type=Path, nargs="?", help="results.json of a run (its rows name their folders)")
    export.add_argument("variant", nargs="?", help="a variant of that run, e.g. student_int8")
    export.add_argument("--folder", type=Path, default=None, help="a cache folder, instead of RESULTS VARIANT")
    export.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist or be empty)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    predict = sub.add_parser("predict", help="label and probability of each text, from an exported folder")
    predict.add_argument("folder", type=Path, help="a folder written by compress export")
    predict.add_argument("texts", nargs="+", metavar="TEXT")


def _progress(message: str) -> None:
    print(f"[compress {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return choice


def cmd_run(args) -> int:
    from compression import data

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    data.resolve_data_dir(args.data)  # fail on a bad folder before loading any model
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out}: exists and is not a folder")
    device = _device(args.device)
    from compression import pipeline, report  # slow imports, after the arguments are known to be good

    results = pipeline.run(
        args.profile, args.base, args.data, args.cache, device, args.threads, _progress, args.pooling)
    written = report.write_results(results, args.out)
    print(report.table(results["variants"]))
    _progress("wrote " + ", ".join(str(p) for p in written))
    return 0


def _read_results(path: Path) -> dict:
    from compression.gate import validate_results
    from compression.models import read_json

    return validate_results(read_json(path), path)


def cmd_check(args) -> int:
    from compression import gate

    results = _read_results(args.results)
    findings = gate.check(results, gate.load_baselines(args.baselines))
    width = max(len(f.variant) for f in findings) if findings else 0
    print(f"| {'variant':<{width}} | metric | budget | value | result |\n|:--|:--|--:|--:|:--|")
    for f in findings:
        value = "missing" if f.value is None else f"{f.value:g}"
        print(f"| {f.variant:<{width}} | {f.metric} | {f.comparison} {f.budget:g} | {value} | "
              f"{'pass' if f.ok else 'FAIL'} |")
    failed = [f for f in findings if not f.ok]
    for f in failed:
        print(gate.failure_message(f, str(args.results)), file=sys.stderr)
    print(f"{len(findings) - len(failed)} passed, {len(failed)} failed")
    return EXIT_BREACH if failed else 0


def cmd_baselines(args) -> int:
    from compression import gate, report

    runs = [_read_results(path) for path in args.accept]
    if args.baselines.exists():
        current = gate.load_baselines(args.baselines)
    else:
        current = {"schema_version": gate.SCHEMA_VERSION, "profiles": {}, "gpu": {}}
    new, changes = gate.accept(runs, current)
    report.write_atomic(args.baselines, (json.dumps(new, indent=2) + "\n").encode())
    for line in changes or ["no change"]:
        print(line)
    print(f"wrote {args.baselines}")
    return 0


def _variant_folder(results_path: Path, variant: str) -> Path:
    """The cache folder of `variant` in a results.json; ValueError naming the file, variant or folder."""
    from compression.models import read_json

    rows = read_json(results_path).get("variants")
    if not isinstance(rows, list):
        raise ValueError(f"{results_path}: key 'variants' missing (not a results.json from compress run)")
    names = [r.get("name") for r in rows if isinstance(r, dict)]
    if variant not in names:
        raise ValueError(f"{results_path}: no variant {variant!r} (has: {', '.join(map(str, names))})")
    folder = rows[names.index(variant)].get("folder")
    if not isinstance(folder, str):
        raise ValueError(f"{results_path}: variant {variant!r} has no 'folder' (a run from before export; "
                         "use --folder)")
    if not Path(folder).is_dir():
        raise ValueError(f"{folder}: the folder of {variant!r} is no longer in the cache (compress run rebuilds it)")
    return Path(folder)


def cmd_export(args) -> int:
    from compression.export import export_variant

    if (args.folder is None) == (args.results is None):
        raise ValueError("give RESULTS VARIANT or --folder CACHE_FOLDER (one of the two)")
    if args.results is not None and args.variant is None:
        raise ValueError(f"{args.results}: which variant? (compress export RESULTS VARIANT --out DIR)")
    folder = args.folder if args.folder is not None else _variant_folder(args.results, args.variant)
    out = export_variant(folder, args.out, overwrite=args.overwrite)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


def cmd_predict(args) -> int:
    from compression.export import predict_texts

    for text, (label, probability) in zip(args.texts, predict_texts(args.folder, args.texts)):
        print(f"{label}\t{probability:.4f}\t{text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verbose:
        import transformers

        transformers.logging.set_verbosity_error()  # e.g. the base model's "classifier newly initialised" report
    commands = {"run": cmd_run, "check": cmd_check, "baselines": cmd_baselines}
    commands |= {"export": cmd_export, "predict": cmd_predict}
    try:
        return commands[args.command](args)
    except (ValueError, OSError) as err:  # DataError is a ValueError; messages name the file / value / option
        print(f"compress {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"compress {args.command}: interrupted (cached artifacts and results are written whole or not at "
              "all)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
