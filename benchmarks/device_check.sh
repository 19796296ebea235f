#!/usr/bin/env bash
# clip_jax's prepared GPU check, one call, under 9 minutes on one H100/H200:
#   - ViT-B-16 / ViT-B-32 bf16 train step: samples/s, MFU, peak memory at batch 256 and 512
#     (XLA vs cuDNN attention; batch 512 retried with the dots_with_no_batch_dims_saveable
#     remat policy if it runs out of memory);
#   - attention variants at the towers' shapes: XLA vs cuDNN, padded vs not, forward and
#     forward+backward time, max |gradient difference| vs XLA and vs a float32 reference;
#   - a profile of the ViT-B-16 step: top XLA ops / kernels by time (perfetto trace json,
#     parsed by benchmarks/profile_summary.py, no TensorBoard needed);
#   - the towers' forward+backward times (benchmarks/step_breakdown.py);
#   - input-pipeline scaling over 2, 4, 8, 16 cores on generated 256 px JPEG shards
#     (benchmarks/input_pipeline.py --threads N), only where tensorflow is installed.
# Writes $OUT/summary.md (tables), $OUT/results.jsonl (every JSON line), $OUT/runs.log.
#
# Wheels: the GPU machine (Python 3.12, x86-64, no network) has jax with CUDA; whatever else
# the check imports travels as wheels in .whl/ (git-ignored), made here beforehand with
#     benchmarks/prepare_device_wheels.sh
# which runs, for each pinned NAME==VERSION,
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --platform manylinux1_x86_64 -d .whl NAME==VERSION
# This script installs only the wheels whose package the machine lacks (so its own jax, flax
# etc. are never shadowed) with
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site WHEELS... && export PYTHONPATH=/tmp/site
# (DEVICE_CHECK_INSTALL=all installs every wheel in .whl/ instead).
#
# Run on the device machine (the `run` tool), from the repository root:
#     run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=600)
# Dry run on any CPU machine (what tests/test_device_check.py does):
#     bash benchmarks/device_check.sh --dry-run --out /tmp/device_check
# Other flags: --budget-s S (default 500), --only env,attention,train_step,breakdown,pipeline,
# --no-pipeline. Environment: PYTHON (default python3), DEVICE_CHECK_WHEELS (default .whl),
# DEVICE_CHECK_SITE (default /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${DEVICE_CHECK_WHEELS:-.whl}"
SITE="${DEVICE_CHECK_SITE:-/tmp/site}"

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  if [ "${DEVICE_CHECK_INSTALL:-missing}" = all ]; then
    mapfile -t wheels < <(ls "$WHEELS"/*.whl)
  else
    mapfile -t wheels < <("$PY" benchmarks/device_check.py --missing-wheels "$WHEELS")
  fi
  if [ "${#wheels[@]}" -gt 0 ]; then
    echo "device_check: installing ${#wheels[@]} wheel(s) into $SITE: ${wheels[*]##*/}" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${wheels[@]}" || { echo "device_check: wheel install failed" >&2; exit 1; }
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/device_check.py "$@"
