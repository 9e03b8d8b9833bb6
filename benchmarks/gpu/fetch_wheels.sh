#!/usr/bin/env bash
# Run HERE (a machine with a package index), before the GPU run: puts into benchmarks/gpu/carry/ (gitignored,
# never committed) everything run_speed.sh needs on a GPU machine that reaches no registry:
#   carry/wheels/diffsr/   diffusers as diffsr pins it (the GPU image has torch, transformers, peft, accelerate,
#                          timm and torchvision, but not diffusers), and the huggingface_hub it is tested with
#                          (installed there only if diffusers does not import with the image's own)
#   carry/wheels/release/  the authors' pinned versions, for a separate environment
#   carry/OSEDiff, carry/S3Diff   the authors' code (python and config files only), exported from local git dirs
# Carry the folder with the run: run(carry=["benchmarks/gpu/carry"], command="bash benchmarks/gpu/run_speed.sh").
#   OSEDIFF_GIT=/work/.mirror/cswry+OSEDiff/repo S3DIFF_GIT=/work/.mirror/ArcticHare105+S3Diff/repo \
#     bash benchmarks/gpu/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")"
CARRY=carry
PIP=${PIP:-pip}
DIFFSR_PYTHON=${DIFFSR_PYTHON:-python3}  # the environment diffsr is tested in
rm -rf "$CARRY" && mkdir -p "$CARRY/wheels/diffsr" "$CARRY/wheels/release" "$CARRY/wheels/tests"

# The versions diffsr is tested with (this checkout's environment).
read -r DIFFUSERS HUB < <("$DIFFSR_PYTHON" -c "import diffusers, huggingface_hub; print(diffusers.__version__, huggingface_hub.__version__)")
$PIP download --quiet --no-deps -d "$CARRY/wheels/diffsr" "diffusers==$DIFFUSERS" "huggingface_hub==$HUB"
# For `run_speed.sh tests` (tests/test_cuda.py), where the image lacks them: pytest and kornia as tested here
# (kornia_rs is compiled per Python version, like tokenizers below).
read -r PYTEST PLUGGY INICONFIG KORNIA KORNIA_RS < <("$DIFFSR_PYTHON" -c "from importlib.metadata import version as v
print(*(v(p) for p in ('pytest', 'pluggy', 'iniconfig', 'kornia', 'kornia_rs')))")
$PIP download --quiet --no-deps -d "$CARRY/wheels/tests" "pytest==$PYTEST" "pluggy==$PLUGGY" \
    "iniconfig==$INICONFIG" "kornia==$KORNIA"
for version in 3.10 3.11 3.12; do
    $PIP download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --python-version "$version" \
        -d "$CARRY/wheels/tests" "kornia_rs==$KORNIA_RS"
done
# The releases' pins (those the parity fixtures were made with): OSEDiff and S3Diff both run on these.
$PIP download --quiet --no-deps -d "$CARRY/wheels/release" diffusers==0.25.1 peft==0.10.0 transformers==4.45.2 \
    huggingface_hub==0.25.2 accelerate==0.30.1 einops==0.8.0
for version in 3.10 3.11 3.12; do  # tokenizers is compiled per Python version: the GPU image's is not known here
    $PIP download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --python-version "$version" \
        -d "$CARRY/wheels/release" tokenizers==0.20.3
done

export_code() {  # git dir -> folder: the tracked .py/.yaml/.txt/.json files of HEAD (no weights or pictures)
    local git_dir=$1 folder=$2
    mkdir -p "$folder"
    git --git-dir="$git_dir" ls-tree -r --name-only -z HEAD | grep -zE '\.(py|yaml|yml|txt|json)$' |
        xargs -0 git --git-dir="$git_dir" archive --format=tar HEAD -- 2>/dev/null | tar -x -C "$folder"
    # (git names the absent large blobs of a partial mirror on stderr; the files wanted are checked here)
    [ -n "$(find "$folder" -name '*.py' | head -1)" ] || { echo "no code exported from $git_dir" >&2; exit 1; }
    git --git-dir="$git_dir" rev-parse HEAD > "$folder/RELEASE_COMMIT"
}
export_code "${OSEDIFF_GIT:?set OSEDIFF_GIT to a git dir of github.com/cswry/OSEDiff}" "$CARRY/OSEDiff"
export_code "${S3DIFF_GIT:?set S3DIFF_GIT to a git dir of github.com/ArcticHare105/S3Diff}" "$CARRY/S3Diff"

ls -l "$CARRY"/wheels/*/
du -sh "$CARRY"/wheels/diffsr "$CARRY"/wheels/release "$CARRY"/wheels/tests "$CARRY"/OSEDiff "$CARRY"/S3Diff
total=$(du -sb "$CARRY" | cut -f1)
echo "total $((total / 1048576)) MiB (the device run carries at most 64 MiB)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "too large to carry" >&2; exit 1; }
