#!/usr/bin/env bash
# Build the MIDOG 2025 Track 2 submission container with the chosen ensemble baked in.
#
#   docker/build.sh [MODEL_URI] [IMAGE_TAG]
#
# MODEL_URI defaults to the registered submission model (set by the `report` step); the
# tracking store is the usual one (MLFLOW_TRACKING_URI or ./mlflow.db). Steps:
#   1. export the model (pyfunc folder: fold checkpoints + config + code) to docker/model;
#   2. run the container's own command on it outside Docker, on a sample of platform stacks
#      when SAMPLE_INPUT names a folder of them (a broken export fails here, not on the platform);
#   3. docker build, and save a gzipped image for upload.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-models:/atypical-mitosis-classifier@submission}"
TAG="${2:-atypical-mitosis-submission:latest}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"

rm -rf docker/model
"$PYTHON" -m pipelines.predict --model "$MODEL" --export docker/model

SAMPLE="${SAMPLE_INPUT:-}"
if [ -n "$SAMPLE" ] && [ -d "$SAMPLE" ]; then
  OUT="$(mktemp -d)"
  "$PYTHON" -m pipelines.predict --model docker/model --input "$SAMPLE" \
      --output "$OUT/multiple-mitotic-figure-classification.json"
  echo "smoke test output: $OUT/multiple-mitotic-figure-classification.json"
fi

docker build -t "$TAG" -f Dockerfile .
echo "test it: docker run --rm --network none --gpus all -v <input dir>:/input:ro -v <output dir>:/output $TAG"
docker save "$TAG" | gzip -c > "docker/$(echo "$TAG" | tr ':/' '__').tar.gz"
echo "saved docker/$(echo "$TAG" | tr ':/' '__').tar.gz (upload this to the platform)"
