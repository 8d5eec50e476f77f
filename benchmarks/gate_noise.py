"""How far the CPU latency gate can be trusted: false alarms on unchanged reruns, and injected slowdowns caught.

    python -m benchmarks.gate_noise                      # smoke profile, 10 reruns, 20% slowdown (40% int8, 60% bnb8)
    python -m benchmarks.gate_noise --reruns 3 --out noise.json

Each rerun times every variant beside the teacher exactly as `pytest benchmarks` does (`gated_latency`: blocked
pairing, a breach re-measured up to three timings), once unchanged and once with a busy-wait of 20% of its
forward added to every call (40% for the int8 rows and 60% for the bnb8 rows, whose gates are looser:
conftest.slowdown_for),
and judges both against baselines.json. Prints per variant the budget, the judged ratios, the false alarms and
the slowdowns caught. Run it on a quiet machine: it is a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from benchmarks.conftest import ATTEMPTS, ROOT, build_suite, delayed, gated_latency, slowdown_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=os.environ.get("COMPRESSION_PROFILE", "smoke"))
    parser.add_argument("--baselines", default=str(ROOT / "baselines.json"))
    parser.add_argument("--reruns", type=int, default=10)
    parser.add_argument("--slowdown", type=float,
                        help="injected fraction for every variant (default: 0.2; 0.4 int8 rows, 0.6 bnb8 rows)")
    parser.add_argument("--variants", nargs="*", help="only these variants (default: all but the teacher)")
    parser.add_argument("--out", type=Path, help="also write every timing here as JSON")
    args = parser.parse_args(argv)
    if args.reruns < 1 or (args.slowdown is not None and not 0 < args.slowdown < 10):
        parser.error("--reruns must be >= 1 and --slowdown in (0, 10)")

    import torch

    from compression.measure import GATE_PASSES, GATE_THREADS
    from compression.schema import read_baselines

    baselines = read_baselines(args.baselines)
    torch.set_num_threads(int(os.environ.get("COMPRESSION_THREADS", torch.get_num_threads())))
    suite = build_suite(args.profile, "cpu")
    names = args.variants or [v.name for v in suite.run.variants if v.name != "teacher"]
    slowdowns = {n: args.slowdown if args.slowdown is not None else slowdown_for(n) for n in names}
    record = {n: {"slowdown": slowdowns[n], "clean": [], "slowed": []} for n in names}
    for rerun in range(args.reruns):
        for name in names:
            model = suite.variant(name).model
            clean = gated_latency(suite, name, model, baselines)
            # the delay is sized on this rerun's first (unretried) timing of the unchanged model
            slow_model = delayed(model, slowdowns[name] * clean.model_ms / 1000.0)
            slowed = gated_latency(suite, name, slow_model, baselines)
            for kind, g in (("clean", clean), ("slowed", slowed)):
                record[name][kind].append({"ratios": g.ratios, "breach": not g.ok})
            print(f"rerun {rerun + 1}/{args.reruns} {name}: unchanged {_fmt(clean)}, slowed {_fmt(slowed)}",
                  file=sys.stderr, flush=True)

    profile = baselines.profiles[suite.run.profile.name]
    print(f"{suite.run.profile.name} profile, {args.reruns} reruns, "
          f"up to {ATTEMPTS} timings per judgement, each of {GATE_PASSES} passes on {GATE_THREADS} thread(s)")
    print("| variant | budget | unchanged ratio (min-median-max) | false alarms | slowdown | slowed ratio "
          "(min-median-max) | caught |")
    print("|:--|--:|:--|--:|--:|:--|--:|")
    for name in names:
        clean, slowed = record[name]["clean"], record[name]["slowed"]
        print(f"| {name} | {profile[name].max_latency_ratio} | {_spread(clean)} | "
              f"{sum(r['breach'] for r in clean)}/{len(clean)} | {slowdowns[name]:.0%} | {_spread(slowed)} | "
              f"{sum(r['breach'] for r in slowed)}/{len(slowed)} |")
    if args.out:
        args.out.write_text(json.dumps({"profile": suite.run.profile.name,
                                        "environment": suite.environment, "variants": record}, indent=1))
    return 0


def _fmt(g) -> str:
    return f"{statistics.median(g.ratios):.4f} ({'breach' if not g.ok else 'pass'}, {len(g.ratios)} timing(s))"


def _spread(runs: list[dict]) -> str:
    judged = sorted(statistics.median(r["ratios"]) for r in runs)
    return f"{judged[0]:.4f}-{statistics.median(judged):.4f}-{judged[-1]:.4f}"


if __name__ == "__main__":
    sys.exit(main())
