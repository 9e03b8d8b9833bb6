#!/usr/bin/env bash
# The whole GPU run of issue #22, offline, in one call that ends within TOTAL_SECONDS (default 540): diffsr against
# the authors' OSEDiff and S3Diff on one GPU, same full-size random weights, same inputs, then the CUDA tests. Needs
# benchmarks/gpu/carry/ from fetch_wheels.sh. Installs only those wheels (pip --no-index --no-deps --target) into
# two folders put first on the path, over the image's torch, transformers, peft, accelerate and torchvision:
# diffusers for diffsr, the releases' pinned versions for theirs (those shadow the image's transformers etc. in
# their worker only). Fetches nothing.
#   run(carry=["benchmarks/gpu/carry"], command="bash benchmarks/gpu/run_speed.sh", timeout_s=600)
#
# Steps, most wanted first; each starts only if the time left allows it (STEP_SECONDS at least) and is cut at the
# time left, so one call gives whatever fits, each table written as it ends:
#   tests   tests/test_cuda.py without the compile cases, at most TESTS_SECONDS (default 150; tiny models: every
#           method on CUDA against the CPU, float16 and bfloat16 against float32, the float16 default, the tiled
#           VAE modes with maps spilled to host RAM, training steps), with pytest and kornia from
#           carry/wheels/tests where the image lacks them
#   speed   per method, one load of three sides (diffsr float16 with its background writes, the same with
#           serial writes, the release in fp16, its scripts' GPU setting): one 512 px image, one 1024 px image
#           (per megapixel), and a folder of 16 inputs of 512 px read from disk and written as PNG (throughput)
#   levers  OSEDiff 512 px: bfloat16, channels-last, torch.compile (reduce-overhead: CUDA graphs; three warm-up
#           images, the first one's time is the compilation) against eager float16 and the release
#   large   2048 px, each side with its own tiling defaults, ours also with 4 tiles per UNet call and with a 4 GB
#           working-memory budget (on a large GPU our default budget may leave the VAE untiled where the releases
#           tile it: the memory goal), REPEATS_LARGE=2
#   batching  three levers not built, measured first (benchmarks/batch_levers.py, float16): four 512 px images
#           in one UNet call against four calls, one image's VAE decode overlapped with the next one's encode,
#           and OSEDiff's tagger for the next image overlapped with this one's UNet call
# `run_speed.sh STEP...` runs only those steps (e.g. `run_speed.sh tests compile-tests`; compile-tests: the
# compiled cases of tests/test_cuda.py, about 2 minutes of compilation). Tables: stdout and
# $OUT/speed_vs_release_gpu.md (or $WORK); the test log: $OUT/test_cuda.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
CARRY=benchmarks/gpu/carry
WORK=${WORK:-/tmp/diffsr-gpu-speed}
RESULTS=${OUT:-$WORK}/speed_vs_release_gpu.md
PYTHON=${PYTHON:-python3}
REPEATS=${REPEATS:-5}
TOTAL_SECONDS=${TOTAL_SECONDS:-540}
STEP_SECONDS=${STEP_SECONDS:-60}
STEPS=${*:-tests speed levers large batching}
mkdir -p "$WORK" "$(dirname "$RESULTS")"
[ -d "$CARRY/wheels" ] || { echo "no $CARRY: run benchmarks/gpu/fetch_wheels.sh first and carry it" >&2; exit 2; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
START=$(date +%s)
left() { echo $(( TOTAL_SECONDS - ($(date +%s) - START) )); }
enough() {  # what: is there time left for it (else said, in the results too)
    [ "$(left)" -ge 10 ] && return 0
    echo "== $1: skipped, $(left) s left of TOTAL_SECONDS=$TOTAL_SECONDS" | tee -a "$RESULTS"
    return 1
}

DIFFSR_SITE=$WORK/diffsr-site RELEASE_SITE=$WORK/release-site
"$PYTHON" -m pip install -q --no-index --no-deps --target "$DIFFSR_SITE" "$(ls "$CARRY"/wheels/diffsr/diffusers-*.whl)"
export PYTHONPATH=src:$DIFFSR_SITE
if ! "$PYTHON" -c "import diffusers.models, transformers, peft" 2>/dev/null; then  # the image's hub too old
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$DIFFSR_SITE" "$(ls "$CARRY"/wheels/diffsr/huggingface_hub-*.whl)"
fi
{
    echo "# diffsr vs the releases on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u '+%Y-%m-%d %H:%M') UTC"
    echo "(benchmarks/gpu/run_speed.sh $STEPS, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown);"
    echo "each table is one case of a benchmarks/speed_vs_release.py run)"
} > "$RESULTS"

tests() {  # seconds pytest-arguments...: tests/test_cuda.py, with pytest and kornia from the carry where missing
    local limit=$1
    shift
    for module in pytest kornia; do
        "$PYTHON" -c "import $module" 2>/dev/null ||
            "$PYTHON" -m pip install -q --no-index --no-deps --target "$DIFFSR_SITE" --find-links "$CARRY/wheels/tests" \
                $( [ $module = kornia ] && echo kornia kornia_rs || echo pytest pluggy iniconfig )
    done
    enough "tests/test_cuda.py $*" || return 0
    [ "$(left)" -lt "$limit" ] && limit=$(left)
    timeout "$limit" "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py "$@" 2>&1 |
        tee -a "${OUT:-$WORK}/test_cuda.log"
    echo "(tests/test_cuda.py $* within $limit s: exit ${PIPESTATUS[0]}, $(( $(date +%s) - START )) s since the start)" | tee -a "$RESULTS"
}

release_ready=
release_setup() {  # the releases' pinned versions and the full-size random weights, once
    [ -n "$release_ready" ] && return 0
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$RELEASE_SITE" --find-links "$CARRY/wheels/release" \
        diffusers==0.25.1 peft==0.10.0 transformers==4.45.2 huggingface_hub==0.25.2 tokenizers==0.20.3 \
        accelerate==0.30.1 einops==0.8.0 || return 1
    CHECK="import torch, diffusers, transformers, peft; print(torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"
    "$PYTHON" -c "$CHECK" || return 1
    PYTHONPATH=$RELEASE_SITE "$PYTHON" -c "$CHECK" || return 1
    # The full-size random weights, written once before the timed runs (about a minute).
    PYTHONPATH=$PYTHONPATH:benchmarks "$PYTHON" -c "
from pathlib import Path
from speed_vs_release import ensure_models
for method in ('osediff', 's3diff'):
    ensure_models(Path('$WORK/models'), method)" || return 1
    echo "set-up done, $(( $(date +%s) - START )) s since the start"
    release_ready=1
}

run() {  # method sides extra-args...: one speed_vs_release.py run (its cases in --size), cut at the time left
    local method=$1 sides=$2 checkout=$CARRY/S3Diff
    shift 2
    [ "$method" = osediff ] && checkout=$CARRY/OSEDiff && set -- "$@" --release-merge-lora
    # (OSEDiff's release merges its LoRA in its own timing script, test_inference_time.py: its fastest path)
    timed_run "$method: $sides; $*" benchmarks/speed_vs_release.py --method "$method" --device cuda \
        --release-checkout "$checkout" --release-python "$PYTHON" --release-path "$RELEASE_SITE" \
        --release-dtype fp16 --models "$WORK/models" --sides $sides "$@"
}

timed_run() {  # title script-and-arguments...: one benchmark script, cut at the time left, its output in the results
    local title=$1
    shift
    enough "$title" || return 0
    echo "== $title" | tee -a "$RESULTS"
    timeout "$(left)" "$PYTHON" "$@" 2>&1 | tee -a "$RESULTS"
    echo "(exit ${PIPESTATUS[0]}, $(( $(date +%s) - START )) s since the start)" | tee -a "$RESULTS"
}

for step in $STEPS; do
    if [ "$(left)" -lt "$STEP_SECONDS" ]; then
        echo "== $step: skipped, $(left) s left of TOTAL_SECONDS=$TOTAL_SECONDS" | tee -a "$RESULTS"
        continue
    fi
    case $step in
        speed)
            release_setup || exit 1
            for method in osediff s3diff; do
                run $method "diffsr+float16 diffsr+float16+serial-writes release" --size 512 1024 512:16 \
                    --repeats "$REPEATS" --warmup 1
            done ;;
        tests) tests "${TESTS_SECONDS:-150}" -k "not compiled" ;;
        compile-tests) tests "$(left)" -k compiled ;;
        levers)
            release_setup || exit 1
            run osediff "diffsr+bfloat16 diffsr+float16+channels_last diffsr+float16+compile diffsr+float16 release" \
                --size 512 --repeats "$REPEATS" --warmup 3 ;;
        large)
            release_setup || exit 1
            for method in osediff s3diff; do
                run $method "diffsr+float16 diffsr+float16+tile_batch=4 diffsr+float16+max_memory=4 release" --size 2048 \
                    --repeats "${REPEATS_LARGE:-2}" --warmup 1
            done ;;
        batching)
            release_setup || exit 1
            timed_run "batching: benchmarks/batch_levers.py" benchmarks/batch_levers.py --models "$WORK/models" \
                --device cuda --dtype float16 --images 4 --repeats "$REPEATS" ;;
        *) echo "unknown step $step (speed, tests, compile-tests, levers, large, batching)" >&2; exit 2 ;;
    esac
done
echo "results: $RESULTS"
