# What bench/quality.sh and bench/hybrid_choice.sh share, sourced by both (they define `stamp` and set
# DISTILL_DATA_DIR): a trained row's `distill eval` in the background, beside the next row's training, and the
# rows side by side at the end.

eval_in_background() {  # RUN_DIR ROW: score a trained run folder unless it has its results already (log: RUN_DIR.eval.log)
  [ -f "$1/eval/results.json" ] && return 0
  # batch_size=128: the short tasks in a quarter of the forwards of 32 (wikitext stays at rolling_tokens' 16 windows)
  (python3 -m distill eval checkpoint="$1" with_teacher=false data_dir="$DISTILL_DATA_DIR" batch_size=128 \
     max_length=2048 > "$1.eval.log" 2>&1 && stamp "evaluated $2") &
}

compare_rows() {  # OUT RUN_DIR...: `distill compare` of the run folders that trained (read from files: no GPU)
  local out=$1 dir list
  shift
  local trained=()
  for dir in "$@"; do [ -f "$dir/metrics.jsonl" ] && trained+=("$dir"); done
  [ ${#trained[@]} -gt 1 ] || return 0
  list=$(IFS=,; echo "${trained[*]}")
  python3 -m distill compare "runs=[$list]" out="$out" > "$out.log" 2>&1 \
    && stamp "compared: $out/compare.md" || stamp "compare failed: see $out.log"
}
