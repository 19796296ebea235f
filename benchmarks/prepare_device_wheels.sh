#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels benchmarks/device_check.sh installs on the GPU
# machine (Python 3.12, x86-64, no network), assuming it has only jax, jaxlib, their own
# dependencies (numpy, scipy, ml_dtypes, opt_einsum) and the CUDA plugins. device_check.sh
# installs only those whose package is missing there; KINDS.md's list of the current image
# (2026-11-17) already has flax, optax, absl-py, rich, pyyaml, msgpack, pillow, regex and
# sentencepiece, and lacks ml-collections, ftfy, wcwidth and tensorflow.
#
#     benchmarks/prepare_device_wheels.sh [--pipeline] [--tensorflow] [--python-version 3.12]
#                                         [--dest .whl]
#
# Default set (the train-step, attention, profile and breakdown parts): flax, optax and what
# they import (absl-py, msgpack, rich, pygments, markdown-it-py, mdurl, typing-extensions,
# pyyaml, treescope) plus ml-collections (configs/). flax's orbax-checkpoint and tensorstore
# (~20 MB) are left out: the benchmarks never checkpoint. Versions: those of the development
# venv the scripts were tested with.
# --pipeline adds what clip_jax's input pipeline imports besides tensorflow: pillow, ftfy,
#   wcwidth, regex, sentencepiece (HF `tokenizers` is not used by clip_jax).
# --tensorflow adds tensorflow-cpu and its dependencies, resolved for the target. Its wheel
#   alone is ~261 MiB (cp311 2.21.0: 273,829,956 bytes), over the 64 MiB a device call
#   carries: this is for machines without that limit; device_check.sh skips the pipeline
#   part where tensorflow is missing.
# --python-version 3.11 makes a set for this development machine's Python (how the install
#   path was tested here). Prints the total size at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=3.12
DEST=.whl
PIPELINE=0
TENSORFLOW=0
while [ $# -gt 0 ]; do
  case "$1" in
    --pipeline) PIPELINE=1 ;;
    --tensorflow) TENSORFLOW=1; PIPELINE=1 ;;
    --python-version) PYVER="$2"; shift ;;
    --dest) DEST="$2"; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

STEP_WHEELS=(
  flax==0.12.8 optax==0.2.8 absl-py==2.5.1 msgpack==1.1.2 rich==15.0.0 pygments==2.21.0
  markdown-it-py==4.3.0 mdurl==0.1.2 typing-extensions==4.16.0 pyyaml==6.0.3
  treescope==0.1.10 ml-collections==1.1.0
)
PIPELINE_WHEELS=(pillow==12.3.0 ftfy==6.3.1 wcwidth==0.9.4 regex==2026.9.29
                 sentencepiece==0.2.2)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)

wheels=("${STEP_WHEELS[@]}")
[ "$PIPELINE" = 1 ] && wheels+=("${PIPELINE_WHEELS[@]}")
mkdir -p "$DEST"
for spec in "${wheels[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$spec"
done
if [ "$TENSORFLOW" = 1 ]; then
  # With dependencies, resolved for the target; device_check.sh installs only the missing.
  python3 -m pip download -q --only-binary=:all: --python-version "$PYVER" \
    --implementation cp "${PLATFORMS[@]}" -d "$DEST" tensorflow-cpu==2.21.0
fi
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "$(ls "$DEST"/*.whl | wc -l) wheels in $DEST, $((total / 1024)) KiB in all" >&2
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then
  echo "WARNING: over ~60 MiB: with the repository this exceeds the 64 MiB a device call" \
       "carries" >&2
fi
