#!/usr/bin/env bash
# Which attention layers a hybrid keeps, compared at one budget on one GPU (issue 18, sections 1-2): one pure SSD
# student's stages 1-2 (every layer trained alone, so any hybrid of its layers and the teacher's starts from them),
# `distill rank` on it, then stage 3 of each hybrid from those layers (student.init_from), each scored by
# `distill eval` (the eval of one row runs beside the training of the next).
#
#   DISTILL_DATA_DIR=/path/to/data TEACHER_GGUF=/root/teacher/smollm2.gguf bash bench/hybrid_choice.sh [ROW ...]
#
# Rows: rankK (the ranking's first K layers, K = 1..RANK_KEEP; RANK_KEEP, default 6, is how many layers `distill
# rank` chooses: 15 for a rank15 row), even3 ([5,15,25]), fit3 ([0,2,11]: `distill inspect`'s worst fits), pure (no
# attention); default: rank3 even3 fit3. PRESET (default gpu_smollm2_10min) sets the budget:
# its stage 1 and 2 tokens for the shared pure student, its stage 3 tokens for every row. RANK_OVERRIDES adds
# overrides to `distill rank` (e.g. "recall_weight=2"). Rows are resumable as bench/quality.sh's are (a finished
# run folder is trained no further); generation (GEN_TOKENS, default 8M) as there.
set -euo pipefail
: "${DISTILL_DATA_DIR:?set DISTILL_DATA_DIR to the offline data folder (train_text/ and the seven tasks)}"
RUNS=${RUNS:-runs}
PRESET=${PRESET:-gpu_smollm2_10min}
GEN_TOKENS=${GEN_TOKENS:-8000000}
TEACHER=()
if [ -n "${TEACHER_GGUF:-}" ]; then TEACHER=(teacher.source=gguf "teacher.path=$TEACHER_GGUF"); fi
MIX="data.mix_path='$RUNS/gen/shard-*.jsonl.gz'"
ROWS=("$@")
[ ${#ROWS[@]} -gt 0 ] || ROWS=(rank3 even3 fit3)
BASE="$RUNS/choice_s12"
RANK_KEEP=${RANK_KEEP:-6}
for row in "${ROWS[@]}"; do  # refused before any GPU time is spent
  case $row in
    rank[0-9]*) [ "${row#rank}" -le "$RANK_KEEP" ] || { echo "$row needs RANK_KEEP=${row#rank} or more" >&2; exit 2; } ;;
    even3 | fit3 | pure) ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
done
mkdir -p "$RUNS"
stamp() { echo "=== $(date +%T) $*"; }
source "$(dirname "$0")/rows_lib.sh"

if [ "$GEN_TOKENS" -gt 0 ]; then
  stamp "generate $GEN_TOKENS tokens"
  python3 -m distill generate "${TEACHER[@]}" data=nltk-train out="$RUNS/gen" tokens="$GEN_TOKENS" batch_size=2048 \
    progress=false > "$RUNS/generate.log" 2>&1
fi
stamp "stages 1-2 of the pure student"
python3 -m distill train experiment="$PRESET" "${TEACHER[@]}" "$MIX" "pipeline=[stage1,stage2]" \
  "student.attention_layers=[]" run_dir="$BASE" \
  > "$BASE.train.log" 2>&1
ranked_count() { python3 -c "import json; print(len(json.load(open('$BASE/rank/ranking.json'))['path']))"; }
if [ ! -f "$BASE/rank/ranking.json" ] || [ "$(ranked_count)" -lt "$RANK_KEEP" ]; then
  stamp "rank ($RANK_KEEP layers)"
  read -r -a extra <<< "${RANK_OVERRIDES:-}"
  python3 -m distill rank checkpoint="$BASE" keep="$RANK_KEEP" "${extra[@]}" > "$BASE.rank.log" 2>&1
fi
ranked() {  # the first $1 layers of the greedy choice, as a list
  python3 -c "import json,sys; p=json.load(open('$BASE/rank/ranking.json'))['path']; \
print('[' + ','.join(str(l) for l in sorted(x['layer'] for x in p[:int(sys.argv[1])])) + ']')" "$1"
}
for row in "${ROWS[@]}"; do
  case $row in
    rank[0-9]*) layers=$(ranked "${row#rank}") ;;
    even3) layers="[5,15,25]" ;;
    fit3) layers="[0,2,11]" ;;
    pure) layers="[]" ;;
  esac
  dir="$RUNS/choice_$row"
  stamp "stage 3 of $row: attention layers $layers"
  if python3 -m distill train experiment="$PRESET" "${TEACHER[@]}" "$MIX" "pipeline=[stage3]" \
      "student.attention_layers=$layers" student.init_from="$BASE" run_dir="$dir" > "$dir.train.log" 2>&1; then
    eval_in_background "$dir" "$row"
  else
    stamp "train $row failed: see $dir.train.log"
  fi
done
wait
compare_rows "$RUNS/choice_compare" "${ROWS[@]/#/$RUNS/choice_}"
stamp "done"
