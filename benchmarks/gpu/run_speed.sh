#!/usr/bin/env bash
# The whole GPU speed run of issue #22, offline, in under ten minutes: diffsr against the authors' OSEDiff and
# S3Diff on one GPU, same full-size random weights, same inputs, at 512 and 1024 px output, diffsr in float16
# and bfloat16, the releases in fp16 (their scripts' GPU setting). Needs benchmarks/gpu/carry/ from
# fetch_wheels.sh. Installs only those wheels (pip --no-index --no-deps --target) into two folders put first
# on the path, over the image's torch, transformers, peft, accelerate and torchvision: diffusers for diffsr,
# the releases' pinned versions for theirs (those shadow the image's transformers etc. in their worker only).
# Fetches nothing. The tables go to stdout and to $OUT/speed_vs_release_gpu.md (or $WORK).
#   run(carry=["benchmarks/gpu/carry"], command="bash benchmarks/gpu/run_speed.sh", timeout_s=600)
# `run_speed.sh tests` runs tests/test_cuda.py instead (tiny models: every method on CUDA against the CPU, float16
# and bfloat16 against float32, the float16 default, compiled OSEDiff and S3Diff (torch.compile needs triton, which
# CUDA builds of torch bring), the tiled VAE modes with maps spilled to host RAM, training
# steps), with pytest and kornia from carry/wheels/tests where the image lacks them; its log goes to
# $OUT/test_cuda.log. About 3-5 minutes with the compile tests (not measured yet): run it first, in the same warm
# machine.
# `run_speed.sh large` runs the 2048 px case (REPEATS=2 suggested, up to 4 minutes per method), if device time is
# left after the other two. `run_speed.sh compile` times OSEDiff compiled (load_upscaler(compile="reduce-overhead"),
# CUDA graphs) against eager float16 and the release at 512 and 1024 px, three warm-up images each, the first
# one's time (the compilation) reported.
set -uo pipefail
cd "$(dirname "$0")/../.."
CARRY=benchmarks/gpu/carry
WORK=${WORK:-/tmp/diffsr-gpu-speed}
RESULTS=${OUT:-$WORK}/speed_vs_release_gpu.md
PYTHON=${PYTHON:-python3}
REPEATS=${REPEATS:-5}
mkdir -p "$WORK" "$(dirname "$RESULTS")"
[ -d "$CARRY/wheels" ] || { echo "no $CARRY: run benchmarks/gpu/fetch_wheels.sh first and carry it" >&2; exit 2; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
START=$(date +%s)

DIFFSR_SITE=$WORK/diffsr-site RELEASE_SITE=$WORK/release-site
"$PYTHON" -m pip install -q --no-index --no-deps --target "$DIFFSR_SITE" "$(ls "$CARRY"/wheels/diffsr/diffusers-*.whl)"
export PYTHONPATH=src:$DIFFSR_SITE
if ! "$PYTHON" -c "import diffusers.models, transformers, peft" 2>/dev/null; then  # the image's hub too old
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$DIFFSR_SITE" "$(ls "$CARRY"/wheels/diffsr/huggingface_hub-*.whl)"
fi
if [ "${1:-speed}" = tests ]; then
    for module in pytest kornia; do
        "$PYTHON" -c "import $module" 2>/dev/null ||
            "$PYTHON" -m pip install -q --no-index --no-deps --target "$DIFFSR_SITE" --find-links "$CARRY/wheels/tests" \
                $( [ $module = kornia ] && echo kornia kornia_rs || echo pytest pluggy iniconfig )
    done
    timeout 500 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "${OUT:-$WORK}/test_cuda.log"
    exit "${PIPESTATUS[0]}"
fi
"$PYTHON" -m pip install -q --no-index --no-deps --target "$RELEASE_SITE" --find-links "$CARRY/wheels/release" \
    diffusers==0.25.1 peft==0.10.0 transformers==4.45.2 huggingface_hub==0.25.2 tokenizers==0.20.3 \
    accelerate==0.30.1 einops==0.8.0 || exit 1
CHECK="import torch, diffusers, transformers, peft; print(torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"
"$PYTHON" -c "$CHECK" || exit 1
PYTHONPATH=$RELEASE_SITE "$PYTHON" -c "$CHECK" || exit 1

# The full-size random weights, written once before the timed runs (about a minute).
PYTHONPATH=$PYTHONPATH:benchmarks "$PYTHON" -c "
from pathlib import Path
from speed_vs_release import ensure_models
for method in ('osediff', 's3diff'):
    ensure_models(Path('$WORK/models'), method)" || exit 1
echo "set-up done in $(( $(date +%s) - START )) s"

{
    echo "# diffsr vs the releases on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u '+%Y-%m-%d %H:%M') UTC"
    echo "(benchmarks/gpu/run_speed.sh; each table is one benchmarks/speed_vs_release.py run)"
} > "$RESULTS"
RUN_SECONDS=${RUN_SECONDS:-120}
run() {  # method size extra-args...: one interleaved run of three sides, at most RUN_SECONDS
    local method=$1 size=$2 checkout=$CARRY/S3Diff
    shift 2
    [ "$method" = osediff ] && checkout=$CARRY/OSEDiff
    echo "== $method $size px $*" | tee -a "$RESULTS"
    timeout "$RUN_SECONDS" "$PYTHON" benchmarks/speed_vs_release.py --method "$method" --size "$size" --device cuda \
        --release-checkout "$checkout" --release-python "$PYTHON" --release-path "$RELEASE_SITE" \
        --release-dtype fp16 --models "$WORK/models" --repeats "$REPEATS" --warmup "${WARMUP:-1}" \
        --sides ${SIDES:-diffsr+float16 diffsr+bfloat16 release} "$@" 2>&1 | tee -a "$RESULTS"
    echo "(exit ${PIPESTATUS[0]}, $(( $(date +%s) - START )) s since the start)" | tee -a "$RESULTS"
}
# OSEDiff's release merges its LoRA in its own timing script (test_inference_time.py): its fastest path.
if [ "${1:-speed}" = large ]; then  # the issue's 2048 px case, each side with its own tiling defaults
    RUN_SECONDS=${RUN_SECONDS_LARGE:-240}
    run osediff 2048 --release-merge-lora
    run s3diff 2048
elif [ "${1:-speed}" = compile ]; then  # torch.compile's reduce-overhead (CUDA graphs) against eager, float16
    RUN_SECONDS=${RUN_SECONDS_COMPILE:-270} SIDES="diffsr+float16+compile diffsr+float16 release" WARMUP=3
    run osediff 512 --release-merge-lora
    run osediff 1024 --release-merge-lora
else
    run osediff 512 --release-merge-lora
    run osediff 1024 --release-merge-lora
    run s3diff 512
    run s3diff 1024
fi
echo "results: $RESULTS"
