#!/usr/bin/env bash
# A CPU-sized Table 1: SmolLM2-135M-Instruct on short arithmetic (data/, made by `python -m intuitor_harness.tasks arithmetic data`),
# one shared budget for every method, then greedy evaluation of each final model on the held-out split.
# Usage: bash docs/table1.sh PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf [methods...]   (about 15 min per method, 2 cores)
# Interrupted (Ctrl-C)? Run the same command again: a method already evaluated is skipped, an interrupted one
# continues from its newest checkpoint (every 10 steps), and each log is appended to, never replaced.
set -euo pipefail
M=$1; shift
METHODS=${*:-"grpo grpo_pv intuitor"}
OUT=runs/table1
mkdir -p $OUT
COMMON="--model $M --dataset data/arithmetic_train.jsonl --prompt_column question --prompts_per_step 4
  --num_generations 4 --max_completion_length 64 --max_steps 40 --learning_rate 5e-5 --micro_batch_size 8
  --save_steps 10 --log_completions_steps 10 --seed 42"
declare -A REWARD=([grpo]="--reward accuracy" [grpo_pv]="--reward plurality" [intuitor]="--reward self_certainty"
                   [offline]="--reward self_certainty --certainty_model reference" [neg_entropy]="--reward neg_entropy")
for m in $METHODS; do
  [[ -v REWARD[$m] ]] || { echo "error: unknown method '$m'; choose from: ${!REWARD[*]}" >&2; exit 2; }
done
trap 'echo; echo "interrupted: run the same command again to continue (finished methods are skipped, the rest resume)"; exit 130' INT
for m in $METHODS; do
  if [[ -s $OUT/$m.eval.jsonl ]]; then echo "$m: done before ($OUT/$m.eval.jsonl), skipped"; continue; fi
  RESUME=""  # a run begun before continues from its newest checkpoint, or starts again if it had none yet
  if compgen -G "$OUT/$m/checkpoint-*" >/dev/null; then RESUME="--resume"; elif [[ -d $OUT/$m ]]; then RESUME="--overwrite_output_dir"; fi
  echo "$m: training${RESUME:+ ($RESUME)}, log: $OUT/$m.log  (follow it with: tail -f $OUT/$m.log)"
  echo "=== $(date -u +%FT%TZ) python intuitor.py ... ${REWARD[$m]} --output_dir $OUT/$m $RESUME" >> $OUT/$m.log
  /usr/bin/time -a -o $OUT/$m.log -f "$m train wall %e s" python intuitor.py $COMMON ${REWARD[$m]} \
      --output_dir $OUT/$m $RESUME >> $OUT/$m.log 2>&1 \
      || { echo "$m: training stopped (last lines of $OUT/$m.log below); run the same command again to continue"; tail -n 3 $OUT/$m.log; exit 1; }
  echo "$m: evaluating checkpoint-40, log: $OUT/$m.eval.log"
  /usr/bin/time -a -o $OUT/$m.eval.log -f "$m eval wall %e s" python eval.py --model $OUT/$m/checkpoint-40 \
      --benchmark arithmetic --max_new_tokens 64 --batch_size 100 --output $OUT/$m.eval.jsonl \
      >> $OUT/$m.eval.log 2>&1 || { echo "$m: evaluation failed, see $OUT/$m.eval.log"; exit 1; }
  grep "accuracy" $OUT/$m.eval.log | tail -n 1
done
echo "done: records in $OUT/; compare them with: python eval.py compare $OUT/base.eval.jsonl $OUT/<method>.eval.jsonl"
