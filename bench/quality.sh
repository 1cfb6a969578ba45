#!/usr/bin/env bash
# The quality table of bench/RESULTS.md on one GPU: teacher-written data, then each row's `distill train` and its
# `distill eval` (the eval of one row runs beside the training of the next), one log per run under $RUNS.
#
#   DISTILL_DATA_DIR=/path/to/data TEACHER_GGUF=/root/teacher/smollm2.gguf bash bench/quality.sh [ROW ...]
#
# Rows: pure_discrete pure_mamba2 hybrid_data hybrid_even abl_123 abl_23 abl_3 abl_123_real (default: all, in that
# order; abl_123_real is abl_123 on the real text alone, the data-mix comparison). The first four also at issue 6's
# ten-minute budget (experiment=gpu_smollm2_10min): pure_discrete_10min, ..., hybrid_even_10min (not in the default).
# Without TEACHER_GGUF the teacher comes from conf/teacher/smollm2.yaml (PyPI). A row whose run folder is finished is
# trained no further (distill train resumes a folder and stops at once when its stages are done) and evaluated again
# only if it has no eval/results.json. Set GEN_TOKENS=0 to skip generation (the rows then need data.mix_fraction=0).
set -euo pipefail
: "${DISTILL_DATA_DIR:?set DISTILL_DATA_DIR to the offline data folder (train_text/ and the seven tasks)}"
RUNS=${RUNS:-runs}
GEN_TOKENS=${GEN_TOKENS:-4000000}
TEACHER=()
if [ -n "${TEACHER_GGUF:-}" ]; then TEACHER=(teacher.source=gguf "teacher.path=$TEACHER_GGUF"); fi
MIX="data.mix_path='$RUNS/gen/shard-*.jsonl.gz'"
ROWS=("$@")
[ ${#ROWS[@]} -gt 0 ] || ROWS=(pure_discrete pure_mamba2 hybrid_data hybrid_even abl_123 abl_23 abl_3 abl_123_real)
mkdir -p "$RUNS"
stamp() { echo "=== $(date +%T) $*"; }

overrides() {  # a row's preset and overrides
  if [[ $1 == *_10min ]]; then overrides "${1%_10min}" | sed 's/experiment=gpu_smollm2 /experiment=gpu_smollm2_10min /; s/experiment=gpu_smollm2$/experiment=gpu_smollm2_10min/'; return; fi
  case $1 in
    pure_discrete) echo "experiment=gpu_smollm2" ;;
    pure_mamba2) echo "experiment=gpu_smollm2 student=mamba2" ;;
    hybrid_data) echo "experiment=gpu_smollm2 student.attention_layers=[0,2,11]" ;;  # distill inspect's worst fits
    hybrid_even) echo "experiment=gpu_smollm2 student.attention_layers=[5,15,25]" ;;
    abl_123 | abl_23 | abl_3) echo "experiment=ablation_${1#abl_}" ;;
    abl_123_real) echo "experiment=ablation_123 data.mix_fraction=0" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}

if [ "$GEN_TOKENS" -gt 0 ]; then
  stamp "generate $GEN_TOKENS tokens"
  python3 -m distill generate "${TEACHER[@]}" data=nltk-train out="$RUNS/gen" tokens="$GEN_TOKENS" \
    batch_size=2048 progress=false > "$RUNS/generate.log" 2>&1
fi
for row in "${ROWS[@]}"; do
  read -r -a args <<< "$(overrides "$row")"
  stamp "train $row"
  if ! python3 -m distill train "${args[@]}" "${TEACHER[@]}" "$MIX" run_dir="$RUNS/$row" > "$RUNS/$row.train.log" 2>&1
  then
    stamp "train $row failed: see $RUNS/$row.train.log"
    continue
  fi
  if [ ! -f "$RUNS/$row/eval/results.json" ]; then
    (python3 -m distill eval checkpoint="$RUNS/$row" with_teacher=false data_dir="$DISTILL_DATA_DIR" batch_size=32 \
       max_length=2048 > "$RUNS/$row.eval.log" 2>&1 && stamp "evaluated $row") &
  fi
done
wait
stamp "done: $RUNS/*/summary.md, $RUNS/*/eval/results.md"
