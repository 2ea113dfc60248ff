#!/usr/bin/env bash
# Held-out accuracy over training (CPU-sized Table 1): each run at the documented budget saves a checkpoint every
# 10 steps; the checkpoints at EVAL_STEPS are evaluated greedily on the 300 held-out arithmetic problems.
# Usage: [EVAL_STEPS="20 40"] bash docs/over_training.sh PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf [runs...]
# Runs: grpo, intuitor (seed 42), grpo_seed43/44, intuitor_seed43/44, offline (frozen scorer, paper Fig. 7),
# intuitor_lr1e-5, intuitor_beta0.1, and three rewards from the literature (docs/ablations.md): token_sc (token-level
# self-certainty advantages), mean_logprob (RLSC-style), answer_sc (self-certainty over the answer's tokens).
# About 14-20 min of training a run on 2 cores and 70-145 s an evaluation.
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
EVAL="--benchmark arithmetic --max_new_tokens 64 --batch_size 100"
for r in $RUNS; do
  FORMAT=""; [[ $r == plain_* ]] && FORMAT="--prompt_format plain"  # trained and evaluated in one format
  if [[ $r == plain_base ]]; then
    /usr/bin/time -f "$r eval wall %e s" python eval.py --model $M $EVAL $FORMAT --output $OUT/$r.eval.jsonl \
        >> $OUT/$r.eval.log 2>&1
    continue
  fi
  /usr/bin/time -f "$r train wall %e s" python intuitor.py $COMMON ${FLAGS[$r]} $FORMAT --output_dir $OUT/$r \
      > $OUT/$r.log 2>&1
  for step in $STEPS; do
    /usr/bin/time -f "$r step $step eval wall %e s" python eval.py --model $OUT/$r/checkpoint-$step $EVAL $FORMAT \
        --output $OUT/$r.step$step.eval.jsonl >> $OUT/$r.eval.log 2>&1
  done
done
