"""The first hour at a real terminal: step lines that never land inside a live bar and fit 120 columns, no
library bars, eval.py ending on one result line, errors that point the right way without a hub, and a base and a
trained model evaluated side by side with the default paths. Terminal cases run under a pseudo-terminal (pty)."""

import json
import os
import pty
import re
import shutil
import subprocess
import sys

from conftest import DATA, ROOT
from test_runs import OFFLINE, assert_one_error_line, script


def in_terminal(argv, cwd=None, env=OFFLINE):
    """Run argv with stdin, stdout and stderr on a pseudo-terminal of 120 columns; everything it drew."""
    main, child = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    p = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, cwd=cwd, env=env | {"COLUMNS": "120"})
    os.close(child)
    out = b""
    while True:
        try:
            data = os.read(main, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        out += data
    os.close(main)
    return p.wait(), out.decode(errors="replace")


def segments(screen):
    """What a terminal shows line by line: text between newlines and carriage returns (a bar redraws after \\r)."""
    return [s for s in re.split(r"[\r\n]+", screen) if s.strip()]


def test_step_lines_stand_alone_in_a_terminal(tiny_dir, tmp_path):
    argv = [sys.executable, os.path.join(ROOT, "intuitor.py"), "--model", tiny_dir, "--dataset", DATA,
            "--prompts_per_step", "2", "--num_generations", "4", "--max_completion_length", "8", "--max_steps", "3",
            "--save_steps", "2", "--log_completions_steps", "2", "--output_dir", str(tmp_path / "run")]  # fmt: skip
    code, screen = in_terminal(argv)
    assert code == 0, screen[-3000:]
    assert "steps:" in screen  # the project's own bar is live on a terminal
    lines = segments(screen)
    steps = [s for s in lines if "step " in s and "/3 |" in s]
    assert len(steps) == 3 and all(s.lstrip("\x1b[A ").startswith("step ") for s in steps), steps
    assert all(len(s) <= 120 and "it/s" not in s for s in steps), steps
    assert all("--- sample completion" not in s or s.startswith("---") for s in lines)
    for library_bar in ("Loading weights", "Writing model shards", "Converting and de-quantizing"):
        assert library_bar not in screen
    plan = next(s for s in lines if s.startswith("memory plan"))  # its first line; the parts follow, wrapped
    assert len(plan) <= 120, plan


def test_eval_ends_with_one_result_line(tiny_dir, tmp_path):
    argv = [sys.executable, os.path.join(ROOT, "eval.py"), "--model", tiny_dir, "--benchmark", "arithmetic",
            "--limit", "3", "--max_new_tokens", "4", "--output", str(tmp_path / "e.jsonl")]  # fmt: skip
    code, screen = in_terminal(argv)
    assert code == 0, screen[-3000:]
    last = segments(screen)[-1]
    assert last.startswith("arithmetic: accuracy ") and "[95% CI " in last and "3 problems" in last, last
    assert str(tmp_path / "e.jsonl") in last and "{" not in screen.split("arithmetic: accuracy")[-1]
    assert json.loads((tmp_path / "e.summary.json").read_text())["n_problems"] == 3  # the summary in its file


def test_without_the_hub_model_and_dataset_are_named_together(tmp_path):
    env = OFFLINE | {"HF_HOME": str(tmp_path / "empty-cache")}
    p = script("intuitor.py", "--model", "Qwen/Qwen2.5-1.5B", "--output_dir", str(tmp_path / "run"), env=env)
    assert_one_error_line(p, "--model 'Qwen/Qwen2.5-1.5B' and --dataset 'DigitalLearningGmbH/MATH-lighteval'")
    assert "docs/data.md" in p.stderr and "re-download" not in p.stderr and "download it again" not in p.stderr


def test_base_and_trained_evaluate_side_by_side_with_default_paths(tiny_dir, tmp_path):
    trained = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(tiny_dir, trained)
    for model in (tiny_dir, str(trained)):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", model, "--benchmark",
                            "arithmetic", "--limit", "2", "--max_new_tokens", "2"], capture_output=True, text=True,
                           cwd=tmp_path, env=OFFLINE)  # fmt: skip
        assert p.returncode == 0, p.stderr[-2000:]
    base = tmp_path / "runs" / "eval" / os.path.basename(tiny_dir) / "arithmetic.jsonl"
    after = tmp_path / "runs" / "eval" / "run-checkpoint-2" / "arithmetic.jsonl"
    assert base.exists() and after.exists()
    p = script("eval.py", "compare", str(base), str(after))
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == [f"| {tiny_dir}", f"| {trained}"]  # labelled by model
