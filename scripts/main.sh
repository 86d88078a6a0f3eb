#!/usr/bin/env bash
# The main job end to end on the embedded default (no network): convert the SmolLM2-135M-Instruct base ->
# fine-tune it (Ray Train, 2 CPU workers, FSDP2, QLoRA) -> batch-extract SNIPS test (Ray Data) -> evaluate ->
# write artifacts/main/snips/report.md. Installs what it needs first. Extra key=value arguments go to the
# pipeline config, e.g. `bash scripts/main.sh --config configs/pipeline/restaurant8k.yaml`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
if [ $# -eq 0 ]; then set -- --config configs/pipeline/snips.yaml; fi
exec .venv/bin/jsonextract run "$@"
