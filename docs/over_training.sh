#!/usr/bin/env bash
# Held-out accuracy over training (CPU-sized Table 1, seed 42): GRPO and INTUITOR at the documented budget,
# a checkpoint every 10 steps, each evaluated greedily on the 300 held-out arithmetic problems.
# Usage: bash docs/over_training.sh PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf [methods...]  (about 18 min a method)
set -euo pipefail
M=$1; shift
METHODS=${*:-"grpo intuitor"}
OUT=runs/over_training
mkdir -p $OUT
COMMON="--model $M --dataset data/arithmetic_train.jsonl --prompt_column question --prompts_per_step 4
  --num_generations 4 --max_completion_length 64 --max_steps 40 --learning_rate 5e-5 --micro_batch_size 8
  --save_steps 10 --save_total_limit 0 --log_completions_steps 10 --seed 42"
declare -A REWARD=([grpo]="--reward accuracy" [intuitor]="--reward self_certainty")
for m in $METHODS; do
  /usr/bin/time -f "$m train wall %e s" python intuitor.py $COMMON ${REWARD[$m]} --output_dir $OUT/$m > $OUT/$m.log 2>&1
  for step in 10 20 30 40; do
    /usr/bin/time -f "$m step $step eval wall %e s" python eval.py --model $OUT/$m/checkpoint-$step \
        --benchmark arithmetic --max_new_tokens 64 --batch_size 100 --output $OUT/$m.step$step.eval.jsonl \
        >> $OUT/$m.eval.log 2>&1
  done
done
