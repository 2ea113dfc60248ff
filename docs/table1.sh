#!/usr/bin/env bash
# A CPU-sized Table 1: SmolLM2-135M-Instruct on short arithmetic (data/, made by `python -m harness.tasks arithmetic data`),
# one shared budget for every method, then greedy evaluation of each final model on the held-out split.
# Usage: bash docs/table1.sh PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf [methods...]   (about 15 min per method, 2 cores)
set -euo pipefail
M=$1; shift
METHODS=${*:-"grpo grpo_pv intuitor"}
OUT=runs/table1
mkdir -p $OUT
COMMON="--model $M --dataset data/arithmetic_train.jsonl --prompt_column question --prompts_per_step 4
  --num_generations 4 --max_completion_length 64 --max_steps 40 --learning_rate 5e-5 --micro_batch_size 8
  --save_steps 0 --log_completions_steps 10 --seed 42"
declare -A REWARD=([grpo]="--reward accuracy" [grpo_pv]="--reward plurality" [intuitor]="--reward self_certainty"
                   [offline]="--reward self_certainty --certainty_model reference" [neg_entropy]="--reward neg_entropy")
for m in $METHODS; do
  /usr/bin/time -f "$m train wall %e s" python intuitor.py $COMMON ${REWARD[$m]} --output_dir $OUT/$m > $OUT/$m.log 2>&1
  /usr/bin/time -f "$m eval wall %e s" python eval.py --model $OUT/$m/checkpoint-40 --benchmark arithmetic \
      --max_new_tokens 64 --batch_size 100 --output $OUT/$m.eval.jsonl > $OUT/$m.eval.log 2>&1
done
