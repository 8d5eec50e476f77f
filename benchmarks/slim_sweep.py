"""The slim student's size against its accuracy, at other FFN removals, embedding ranks and recoveries.

    python -m benchmarks.slim_sweep --ffn-remove 0.5 0.8 --rank 0          # FFN + vocabulary only
    python -m benchmarks.slim_sweep --ffn-remove 0.5 --rank 128 --recovery-rows 20000

Builds (or loads from the cache) the profile's chain with the slim stage changed, and prints the slim student's
parameters, size (fp32 and int8) and validation accuracy in length-sorted batches of 64 (a quick figure: the
table's is one sentence per call). Every setting is cached like a run's, so a later `compress run` with the same
profile settings loads it. Note that this reads validation: a setting chosen here is chosen on the reported split.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from compression.artifacts import size_mb
from compression.data import tokenize
from compression.low_rank import LowRankConfig
from compression.measure import accuracy, predict
from compression.pipeline import build_variants
from compression.profiles import get_profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="full")
    parser.add_argument("--ffn-remove", type=float, nargs="+", default=[0.5])
    parser.add_argument("--rank", type=int, nargs="+", default=[128], help="embedding rank; 0: not factored")
    parser.add_argument("--recovery-rows", type=int, help="rows of the rank stage's recovery (default: the profile's)")
    parser.add_argument("--data", help="SST-2 folder (default: $SST2_DIR, else GLUE from the hub)")
    args = parser.parse_args(argv)
    base = get_profile(args.profile)
    recovery = base.low_rank_recovery
    if args.recovery_rows:
        recovery = dataclasses.replace(recovery, max_rows=args.recovery_rows)
    print("| FFN removed | rank | recovery rows | parameters | fp32 MB | int8 MB | fp32 acc % | int8 acc % |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|")
    for remove in args.ffn_remove:
        for rank in args.rank:
            profile = dataclasses.replace(base, ffn=dataclasses.replace(base.ffn, remove=remove),
                                          low_rank=LowRankConfig(rank) if rank else None, low_rank_recovery=recovery)
            run = build_variants(profile, data=args.data)
            validation = run.sst2.splits["validation"]
            by_name = {v.name: v for v in run.variants}
            acc = {}
            for name in ("slim_student", "slim_student_int8"):
                v = by_name[name]
                acc[name] = accuracy(predict(v.model, tokenize(validation, v.tokenizer), v.tokenizer),
                                     validation["label"])
            slim = by_name["slim_student"]
            rows = (recovery.max_rows or "all") if rank else "-"  # the recovery runs only after factoring
            print(f"| {remove:g} | {rank or '-'} | {rows} | "
                  f"{slim.parameters:,} | {size_mb(slim.folder):.2f} | {size_mb(by_name['slim_student_int8'].folder):.2f} | "
                  f"{acc['slim_student']:.2f} | {acc['slim_student_int8']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
