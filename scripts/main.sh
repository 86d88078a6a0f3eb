#!/usr/bin/env bash
# The main job end to end on the embedded default: tiny model built from SNIPS -> constrained extraction of SNIPS
# test records -> evaluation table. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
OUT=${OUT:-artifacts/main}
DATA=../shared/data/snips
echo "== 1/3 build the tiny model and tokenizer from $DATA/train.jsonl"
$PY -m jsonextract.tiny --data $DATA --out artifacts/tiny-snips/model --config configs/tiny/snips.yaml
echo "== 2/3 constrained extraction of SNIPS test records (untrained model)"
$PY -m jsonextract.predict --model artifacts/tiny-snips/model --data $DATA/test.jsonl --out $OUT/predictions.jsonl --limit 50
echo "== 3/3 evaluate"
$PY rayjobs/evaluate.py predictions=$OUT/predictions.jsonl gold=$DATA/test.jsonl out=$OUT/metrics.json only_predicted=true
