#!/usr/bin/env bash
# Held-out accuracy over training (CPU-sized Table 1): each run at the documented budget saves a checkpoint every
# 10 steps; the checkpoints at EVAL_STEPS are evaluated greedily on the 300 held-out arithmetic problems.
# Usage: [EVAL_STEPS="20 40"] bash docs/over_training.sh PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf [runs...]
# Runs: grpo, intuitor (seed 42), grpo_seed43/44, intuitor_seed43/44, offline (frozen scorer, paper Fig. 7),
# intuitor_lr1e-5, intuitor_beta0.1, and three rewards from the literature (docs/ablations.md): token_sc (token-level
# self-certainty advantages), mean_logprob (RLSC-style), answer_sc (self-certainty over the answer's tokens). The base-like
# regime (--prompt_format plain: no chat template, trained and evaluated as 'Question: ... Answer:' text):
# plain_base (the model itself, evaluated only), plain_grpo, plain_intuitor and their _seed43/_seed44 runs.
# About 14-20 min of training a run on 2 cores and 70-145 s an evaluation.
# Interrupted (Ctrl-C)? Run the same command again: finished evaluations are skipped, an interrupted run continues
# from its newest checkpoint, and each log is appended to, never replaced.
set -euo pipefail
M=$1; shift
RUNS=${*:-"grpo intuitor"}
STEPS=${EVAL_STEPS:-"10 20 30 40"}
OUT=runs/over_training
mkdir -p $OUT
# Later flags override earlier ones, so each run below names only what it changes.
COMMON="--model $M --dataset data/arithmetic_train.jsonl --prompt_column question --prompts_per_step 4
  --num_generations 4 --max_completion_length 64 --max_steps 40 --learning_rate 5e-5 --beta 0.005
  --micro_batch_size 8 --save_steps 10 --save_total_limit 0 --log_completions_steps 10 --seed 42"
declare -A FLAGS=(
  [grpo]="--reward accuracy"                 [intuitor]="--reward self_certainty"
  [grpo_seed43]="--reward accuracy --seed 43" [intuitor_seed43]="--reward self_certainty --seed 43"
  [grpo_seed44]="--reward accuracy --seed 44" [intuitor_seed44]="--reward self_certainty --seed 44"
  [offline]="--reward self_certainty --certainty_model reference"
  [intuitor_lr1e-5]="--reward self_certainty --learning_rate 1e-5"
  [intuitor_beta0.1]="--reward self_certainty --beta 0.1"
  [token_sc]="--reward token_self_certainty" [mean_logprob]="--reward mean_logprob"
  [answer_sc]="--reward answer_self_certainty"
  [plain_base]="" [plain_grpo]="--reward accuracy" [plain_intuitor]="--reward self_certainty"
  [plain_grpo_seed43]="--reward accuracy --seed 43" [plain_intuitor_seed43]="--reward self_certainty --seed 43"
  [plain_grpo_seed44]="--reward accuracy --seed 44" [plain_intuitor_seed44]="--reward self_certainty --seed 44"
)
for r in $RUNS; do
  [[ -v FLAGS[$r] ]] || { echo "error: unknown run '$r'; choose from: ${!FLAGS[*]}" >&2; exit 2; }
done
trap 'echo; echo "interrupted: run the same command again to continue (finished evaluations are skipped, runs resume)"; exit 130' INT
EVAL="--benchmark arithmetic --max_new_tokens 64 --batch_size 100"
evaluate() {  # evaluate MODEL RECORDS LABEL: skipped when RECORDS exist
  if [[ -s $2 ]]; then echo "$3: evaluated before ($2), skipped"; return; fi
  echo "$3: evaluating, log: $OUT/$r.eval.log"
  /usr/bin/time -a -o $OUT/$r.eval.log -f "$3 eval wall %e s" python eval.py --model $1 $EVAL $FORMAT --output $2 \
      >> $OUT/$r.eval.log 2>&1 || { echo "$3: evaluation failed, see $OUT/$r.eval.log"; exit 1; }
  grep "accuracy" $OUT/$r.eval.log | tail -n 1
}
for r in $RUNS; do
  FORMAT=""; [[ $r == plain_* ]] && FORMAT="--prompt_format plain"  # trained and evaluated in one format
  if [[ $r == plain_base ]]; then evaluate $M $OUT/$r.eval.jsonl "$r"; continue; fi
  if ! [[ -d $OUT/$r/checkpoint-40 ]]; then
    RESUME=""  # a run begun before continues from its newest checkpoint, or starts again if it had none yet
    if compgen -G "$OUT/$r/checkpoint-*" >/dev/null; then RESUME="--resume"; elif [[ -d $OUT/$r ]]; then RESUME="--overwrite_output_dir"; fi
    echo "$r: training${RESUME:+ ($RESUME)}, log: $OUT/$r.log  (follow it with: tail -f $OUT/$r.log)"
    echo "=== $(date -u +%FT%TZ) python intuitor.py ... ${FLAGS[$r]} $FORMAT --output_dir $OUT/$r $RESUME" >> $OUT/$r.log
    /usr/bin/time -a -o $OUT/$r.log -f "$r train wall %e s" python intuitor.py $COMMON ${FLAGS[$r]} $FORMAT \
        --output_dir $OUT/$r $RESUME >> $OUT/$r.log 2>&1 \
        || { echo "$r: training stopped (last lines of $OUT/$r.log below); run the same command again to continue"; tail -n 3 $OUT/$r.log; exit 1; }
  fi
  for step in $STEPS; do
    evaluate $OUT/$r/checkpoint-$step $OUT/$r.step$step.eval.jsonl "$r step $step"
  done
done
echo "done: records in $OUT/; tables: python docs/over_training.py"
