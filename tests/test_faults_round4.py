"""Faults, fourth round: a finished run's records under --resume, evaluations that would share a summary, a user's
empty folders, null gold answers, the alarm across a resume, settings that make every group identical, closed
pipes, out-of-range seeds, trackers without a login, torchrun's own flags, file-size limits, a run folder passed
as a model, plotting a run folder, a second Ctrl-C, the grader's per-sample bounds and brace-less LaTeX. Each
ends held: the right behaviour, or one `error:` line before any model loads, with nothing lost."""

import errno
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import DATA, ROOT
from test_intuitor import metrics, small_run
from test_runs import OFFLINE, assert_one_error_line, script

from intuitor_harness import runs, sandbox, tasks, watch


# ----------------------------------------------------------------------------- runs and their records
def test_resume_of_a_run_without_checkpoints_keeps_its_records(tiny_dir, tmp_path):
    out = tmp_path / "run"
    small_run(tiny_dir, out, "--max_steps", "2", "--save_steps", "0", "--final_checkpoint", "false")
    before = (out / "metrics.jsonl").read_text()
    p = small_run(tiny_dir, out, "--max_steps", "2", "--save_steps", "0", "--resume", check=False)
    assert_one_error_line(p, "holds 2 step records but no checkpoint")
    assert "--overwrite_output_dir" in p.stderr and "memory plan" not in p.stdout + p.stderr
    assert (out / "metrics.jsonl").read_text() == before  # nothing emptied


def test_resume_on_a_new_directory_says_it_starts_at_step_0(tiny_dir, tmp_path):
    p = small_run(tiny_dir, tmp_path / "new", "--max_steps", "1", "--save_steps", "0", "--resume")
    assert "no checkpoint in" in p.stdout and "starting at step 0" in p.stdout


def test_the_writability_probe_leaves_the_users_empty_folders(tiny_dir, tmp_path):
    (tmp_path / "mine" / "empty").mkdir(parents=True)
    os.chmod(tmp_path / "mine" / "empty", 0o750)
    p = small_run(tiny_dir, tmp_path / "mine" / "empty" / "x" / "y", "--dataset", str(tmp_path / "none.jsonl"),
                  check=False)  # fmt: skip
    assert_one_error_line(p, "no such file")  # refused on the dataset, after the probe
    assert (tmp_path / "mine" / "empty").is_dir() and oct(os.stat(tmp_path / "mine" / "empty").st_mode)[-3:] == "750"
    assert not (tmp_path / "mine" / "empty" / "x").exists()


def test_an_empty_metrics_file_does_not_block_the_corrected_rerun(tiny_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")  # what a run that failed before its first step leaves
    small_run(tiny_dir, out, "--max_steps", "1", "--save_steps", "0")
    assert [r["step"] for r in metrics(out)] == [1]


def test_seed_out_of_range_is_refused_before_the_model_loads(tiny_dir, tmp_path):
    p = small_run(tiny_dir, tmp_path / "run", "--seed", str(10**30), check=False)
    assert_one_error_line(p, "--seed must be in [0, 2**62)")
    assert not (tmp_path / "run").exists()


def test_a_dataset_folder_changed_before_resume_is_refused(tiny_dir, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = open(DATA).read()
    (folder / "train.jsonl").write_text(rows)
    before = runs.fingerprint(str(folder))
    assert before and "train.jsonl" in before  # a .jsonl in a folder is fingerprinted
    (folder / "train.jsonl").write_text(rows + rows.splitlines()[0] + "\n")
    assert runs.fingerprint(str(folder)) != before


def test_a_file_size_limit_is_named_as_such():
    with pytest.raises(SystemExit) as stop:
        runs.cannot_write("/x/checkpoint-3", OSError(errno.EFBIG, "File too large"), "free space and continue")
    said = str(stop.value.code)
    assert "ulimit -f" in said and "free space" not in said and "GB free" not in said


def test_the_alarm_continues_across_a_resume():
    def record(step, entropy):
        return {"step": step, "monitor/entropy": entropy, "train/completion_length": 10.0,
                "monitor/repeated_4gram_frac": 0.0, "train/reward/self_certainty": float(step)}  # fmt: skip

    records = [record(s, 2.0 if s <= 5 else 0.1) for s in range(1, 21)]
    whole = watch.HackingAlarm()
    flags = [whole.check(dict(r))[0] for r in records]
    resumed = watch.HackingAlarm()
    kept = [dict(r, **{"monitor/alarm": f}) for r, f in zip(records[:10], flags[:10])]
    resumed.resume(kept)
    assert [resumed.check(dict(r))[0] for r in records[10:]] == flags[10:] and sum(flags[10:]) > 0


# ----------------------------------------------------------------------------- inputs and settings
def test_null_gold_answers_are_missing_not_none(tiny_dir, tmp_path):
    assert tasks.gold_answer(None, "answer") is None and tasks.gold_answer("  ", "answer") is None
    data = tmp_path / "nulls.jsonl"
    data.write_text('{"problem": "1 + 1?", "answer": "2"}\n{"problem": "2 + 2?", "answer": null}\n')
    p = script("intuitor.py", "--model", tiny_dir, "--dataset", str(data), "--reward", "accuracy",
               "--output_dir", str(tmp_path / "run"))  # fmt: skip
    assert_one_error_line(p, "row(s) 1 (counted from 0) have no gold answer")


def test_top_k_1_is_refused(tiny_dir, tmp_path):
    assert_one_error_line(small_run(tiny_dir, tmp_path / "r", "--top_k", "1", check=False), "--top_k must be 0")


def test_identical_groups_are_said_once(tiny_dir, tmp_path):
    p = small_run(tiny_dir, tmp_path, "--max_steps", "2", "--save_steps", "0", "--temperature", "1e-9")
    assert p.stdout.count("every group's rewards were equal") == 1


def test_wandb_without_a_login_is_refused_before_the_model_loads(tiny_dir, tmp_path):
    pytest.importorskip("wandb")
    env = {k: v for k, v in OFFLINE.items() if not k.startswith("WANDB")} | {"HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "intuitor.py"), "--model", tiny_dir, "--dataset", DATA,
                        "--report_to", "wandb", "--output_dir", str(tmp_path / "run")], capture_output=True,
                       text=True, env=env)  # fmt: skip
    assert_one_error_line(p, "no wandb login here")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- pipes and signals
def test_a_closed_pipe_ends_nothing(tiny_dir, tmp_path):
    """`| head -n 1`: the reader goes after one line; the run goes on to its end and keeps its records."""
    argv = [sys.executable, os.path.join(ROOT, "intuitor.py"), "--model", tiny_dir, "--dataset", DATA,
            "--prompts_per_step", "2", "--num_generations", "4", "--max_completion_length", "8",
            "--max_steps", "3", "--save_steps", "0", "--output_dir", str(tmp_path / "run")]  # fmt: skip
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=OFFLINE)
    p.stdout.readline()
    p.stdout.close()  # the reader is gone
    err = p.stderr.read().decode()
    assert p.wait() == 0 and "Traceback" not in err, err[-2000:]
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3]


def test_a_second_ctrl_c_is_ignored_during_the_cleanup():
    code = (
        "import os, signal, time\nfrom intuitor_harness import runs\nruns.interrupt_once()\n"
        "try:\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(5)\n"
        "except KeyboardInterrupt:\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(0.2)\n"
        "    print('cleaned up')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=OFFLINE)
    assert p.stdout.strip() == "cleaned up" and "Traceback" not in p.stderr and p.returncode == 0


def test_torchrun_passes_the_sample_count_to_eval():
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(["--nproc_per_node=2", "eval.py", "--model", "m", "--num_samples", "3"])
    assert args.training_script == "eval.py" and args.training_script_args[-2:] == ["--num_samples", "3"]


# ----------------------------------------------------------------------------- eval.py
def test_eval_outputs_that_would_share_a_summary_are_refused(tiny_dir, tmp_path):
    p = script("eval.py", "--model", tiny_dir, "--benchmark", "arithmetic", "--output", str(tmp_path / "a.json"))
    assert_one_error_line(p, "must end with .jsonl")


def test_eval_of_a_run_folder_names_its_checkpoint(tmp_path):
    (tmp_path / "run" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    p = script("eval.py", "--model", str(tmp_path / "run"), "--benchmark", "arithmetic", "--output",
               str(tmp_path / "e.jsonl"))  # fmt: skip
    assert_one_error_line(p, "is a training run's folder, not a model")
    assert "checkpoint-4" in p.stderr


def test_plot_takes_a_run_folder_and_an_upper_case_png(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/self_certainty": 2.0}) + "\n")
    p = script("intuitor.py", "plot", str(run), str(tmp_path / "OUT.PNG"))
    assert p.returncode == 0 and (tmp_path / "OUT.PNG").read_bytes()[:4] == b"\x89PNG", p.stderr
    assert_one_error_line(script("intuitor.py", "plot", str(tmp_path / "nothing")), "neither a run's folder")


# ----------------------------------------------------------------------------- the grader
def hostile(source):
    return sandbox.run(sandbox.Job(source), timeout=20)


FORK_COUNT = """
import ctypes, time
libc, n = ctypes.CDLL(None), 0
for _ in range(200):
    pid = libc.fork()
    if pid == 0:
        time.sleep(2)
        libc._exit(0)
    if pid < 0:
        break
    n += 1
print(n)
"""
MEMORY_TOGETHER = """
import ctypes, os
libc = ctypes.CDLL(None)
for _ in range(3):
    if libc.fork() == 0:
        block = bytearray(900 << 20)
        libc._exit(0 if block else 1)
done = 0
for _ in range(3):
    pid, status = os.wait()
    done += os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
print(done)
"""
WRITABLE = """
def fill(path):
    n = 0
    try:
        with open(path, "wb") as f:
            for _ in range(300):
                f.write(b"x" * (1 << 20))
                f.flush()
                n += 1
    except OSError:
        pass
    return n
print(fill("/tmp/big"), fill("/dev/big"), fill("work-big"))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not sandbox.SampleCgroup.usable(), reason="needs root and cgroup v1")
def test_a_samples_processes_are_bounded_together_as_root():
    result = hostile(FORK_COUNT)
    assert result.passed and int(result.stdout) <= 32  # the documented 32 processes (2000 without the bound)


@pytest.mark.skipif(os.geteuid() != 0 or not sandbox.SampleCgroup.usable(), reason="needs root and cgroup v1")
def test_a_samples_memory_is_bounded_across_its_processes():
    result = hostile(MEMORY_TOGETHER)  # 3 x 900 MiB at once would be 2.7 GiB: at most two fit in 2 GiB
    assert result.stdout.strip() in ("", "0", "1", "2"), result.stdout


@pytest.mark.skipif(sandbox.isolation() != "bubblewrap", reason="needs bubblewrap")
def test_a_sample_can_write_little_outside_its_work_directory():
    tmp, dev, work = map(int, hostile(WRITABLE).stdout.split())
    assert tmp <= 1 and dev == 0 and work <= 64  # /tmp: 1 MiB, /dev: read-only, the work directory: 64 MiB


def test_a_lone_surrogate_is_a_failed_sample_not_a_crash():
    result = sandbox.run(sandbox.Job("x = '\udcff'\nprint(x)\n"), timeout=10)
    assert not result.passed and result.status == "failed"


def test_brace_less_latex_gold_is_read_as_written():
    gold = "\\frac \\pi4 + 2 - \\sqrt2"
    assert tasks.is_correct("\\frac{\\pi}{4}+2-\\sqrt{2}", gold) and not tasks.is_correct("2", gold)
    assert tasks.is_correct("\\frac{1}{2}", "\\dfrac12") and tasks.is_correct("0.5", "\\frac12")
    assert math.isclose(0.5, 1 / 2)
