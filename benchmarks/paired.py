"""Batch-1 latency of saved variants against another one, timed as the CPU gate times (blocked pairing).

    python -m benchmarks.paired out/results.json --reference student_int8 --variants pruned_student_int8 slim_student_int8
    python -m benchmarks.paired out/results.json --reference student_int8 --threads 1 2 --repeats 3
    python -m benchmarks.paired out/results.json --reference teacher --variants student_int8 --threads 1 --repeats 8

Reads the variants from the folders a `compress run` results.json names, so it times exactly the run's models.
Each variant reads the same validation sentences (the first `--examples`) through its own tokenizer. Prints,
per thread count, each variant's ratio to the reference (the median of block ratios) for every repeat, and
their median. Run it on a quiet machine: it is a timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from compression.artifacts import load_model
from compression.data import load_sst2, tokenize
from compression.measure import paired_latency, single_examples
from compression.schema import Results, read_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a compress run's results.json")
    parser.add_argument("--reference", required=True, help="the variant the others are timed against")
    parser.add_argument("--variants", nargs="*", help="variants to time (default: every other one in the file)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", type=int, default=1, help="passes over the sentences per timing (the gate: 3)")
    parser.add_argument("--examples", type=int, default=300, help="validation sentences timed (default 300)")
    parser.add_argument("--data", help="SST-2 folder (default: $SST2_DIR, else GLUE from the hub)")
    args = parser.parse_args(argv)
    if args.passes < 1 or args.repeats < 1:
        parser.error("--passes and --repeats must be >= 1")
    try:
        results: Results = read_results(args.results)
    except (OSError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    rows = {v.name: v for v in results.variants}
    names = args.variants or [n for n in rows if n != args.reference]
    unknown = [n for n in [args.reference, *names] if n not in rows or rows[n].folder is None]
    if unknown:
        parser.exit(2, f"{parser.prog}: error: {args.results}: no saved folder for {', '.join(unknown)} "
                       f"(it has {', '.join(rows)})\n")
    validation = load_sst2(args.data).splits["validation"]

    def load(name: str):
        model, tokenizer = load_model(rows[name].folder)
        examples = single_examples(tokenize(validation, tokenizer), tokenizer, args.examples)
        return model, examples

    reference, reference_examples = load(args.reference)
    print(f"batch-1 latency / {args.reference}'s, {args.examples} validation sentences, {args.repeats} repeats")
    for name in names:
        model, examples = load(name)
        for threads in args.threads:
            ratios = [paired_latency(model, reference, examples, reference_examples=reference_examples,
                                     threads=threads, passes=args.passes).ratio for _ in range(args.repeats)]
            print(f"{name:24s} {threads} thread{'s' if threads > 1 else ' '}  median {statistics.median(ratios):.3f}"
                  f"  ({', '.join(f'{r:.3f}' for r in ratios)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
