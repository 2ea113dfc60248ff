"""Faults, third round: Ctrl-C at every phase, a full or read-only disk, a model or dataset changed under --resume,
input that is not text, a tokenizer that does not fit its model, and logs that stay clean when redirected. Each
ends in one line, a non-zero exit and nothing lost, torn or mixed."""

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
from conftest import DATA, ROOT, make_model, make_tokenizer
from test_intuitor import metrics, small_run
from test_runs import OFFLINE, assert_one_error_line, script

import intuitor as I
from intuitor_harness import runs

INTERRUPT = """
import os, runpy, signal, sys, torch
phase, calls = sys.argv[1], [0]
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, also when started in the background

def interrupt_on(module, name, nth):  # Ctrl-C arrives during the nth call
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    setattr(module, name, wrapped)

target = {"sample": (torch, "multinomial", 20), "update": (torch.nn.utils, "clip_grad_norm_", 2),
          "checkpoint": (torch, "save", 2)}[phase]
interrupt_on(*target)
sys.argv = ["intuitor.py", *sys.argv[2:]]
runpy.run_path(os.path.join(os.environ["ROOT"], "intuitor.py"), run_name="__main__")
"""


def run_args(model, out, *extra):
    return ["--model", model, "--dataset", DATA, "--prompts_per_step", "2", "--num_generations", "4",
            "--max_completion_length", "16", "--micro_batch_size", "3", "--output_dir", str(out), *extra]  # fmt: skip


def left_behind(out):
    return [n for n in os.listdir(out) if n.startswith(".") or ".tmp" in n]


# ----------------------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize("phase", ["sample", "update", "checkpoint"])
def test_ctrl_c_says_what_was_kept_and_the_run_resumes(tiny_dir, tmp_path, phase):
    out = tmp_path / "run"
    argv = run_args(tiny_dir, out, "--max_steps", "4", "--save_steps", "1")
    p = subprocess.run([sys.executable, "-c", INTERRUPT, phase, *argv], capture_output=True, text=True,
                       env=dict(OFFLINE, ROOT=ROOT))  # fmt: skip
    assert p.returncode == 130 and "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr, p.stderr
    said = [line for line in p.stderr.splitlines() if line.startswith("interrupted:")]
    assert len(said) == 1 and "--resume" in said[0], p.stderr[-2000:]
    assert "checkpoint-1 (the newest checkpoint)" in said[0]
    assert left_behind(out) == []  # no half-written checkpoint, no temporary file
    small_run(tiny_dir, out, "--max_steps", "4", "--save_steps", "1", "--resume")  # the fix it names works
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def test_ctrl_c_during_eval_is_one_line_and_the_path_stays_free(tiny_dir, tmp_path):
    code = (
        "import os, runpy, sys\nimport intuitor_harness.benchmarks as B\n"
        "def grade(*a, **k):\n    raise KeyboardInterrupt\nB.grade_batch = grade\n"
        "sys.argv = ['eval.py', *sys.argv[1:]]\nrunpy.run_path(os.path.join(os.environ['ROOT'], 'eval.py'), "
        "run_name='__main__')\n"
    )
    output = tmp_path / "e.jsonl"
    argv = ["--model", tiny_dir, "--benchmark", "arithmetic", "--limit", "2", "--max_new_tokens", "4"]
    p = subprocess.run([sys.executable, "-c", code, *argv, "--output", str(output)], capture_output=True, text=True,
                       env=dict(OFFLINE, ROOT=ROOT))  # fmt: skip
    assert p.returncode == 130 and "Traceback" not in p.stderr
    assert [line for line in p.stderr.splitlines() if line.startswith("interrupted:")] != []
    assert script("eval.py", *argv, "--output", str(output)).returncode == 0  # the same command, no --overwrite


# ----------------------------------------------------------------------------- a full or read-only disk
@contextmanager
def small_disk(path, size="1m", options=""):
    """A tmpfs of `size` mounted at path (this test's own folder), unmounted after."""
    os.makedirs(path, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(path)],
                           capture_output=True)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({mount.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder):
    """Fill the filesystem of `folder` to the last byte with a file of this test's own."""
    f = open(os.path.join(folder, "filler"), "wb", buffering=0)
    try:
        while True:
            f.write(b"\0" * 4096)
    except OSError:
        pass
    finally:
        f.close()


def test_a_checkpoint_on_a_full_disk_is_one_line_naming_the_disk(tiny_dir, tmp_path):
    with small_disk(tmp_path / "disk", "400k") as disk:  # room for the metrics, not for a checkpoint
        out = disk / "run"
        p = small_run(tiny_dir, out, "--max_steps", "2", "--save_steps", "1", check=False)
        assert_one_error_line(p, f"cannot write {out / 'checkpoint-1'} (")
        assert "free on " + str(disk) in p.stderr and "no earlier checkpoint exists" in p.stderr
        assert left_behind(out) == [] and [r["step"] for r in metrics(out)] == [1]  # nothing torn, nothing lost


def test_resume_eval_and_plot_on_a_full_or_read_only_disk(tiny_dir, tmp_path):
    done = tmp_path / "done"
    small_run(tiny_dir, done, "--max_steps", "2", "--save_steps", "1")
    with small_disk(tmp_path / "disk", "32m") as disk:
        out = disk / "run"
        shutil.copytree(done, out)
        before = (out / "metrics.jsonl").read_bytes()
        fill(disk)
        p = small_run(tiny_dir, out, "--max_steps", "2", "--save_steps", "1", "--resume", check=False)
        assert_one_error_line(p, f"cannot write {out / 'metrics.jsonl'} (No space left on device")
        assert (out / "metrics.jsonl").read_bytes() == before and left_behind(out) == []
        output = disk / "eval.jsonl"
        output.touch()  # claimed before the disk filled up
        e = script("eval.py", "--model", tiny_dir, "--benchmark", "arithmetic", "--limit", "3", "--max_new_tokens",
                   "4", "--output", str(output))  # fmt: skip
        assert_one_error_line(e, f"cannot write {output} (No space left on device")
        assert output.read_bytes() == b"" and sorted(os.listdir(disk)) == ["eval.jsonl", "filler", "run"]
    with small_disk(tmp_path / "readonly", "1m", ",ro") as readonly:
        p = script("intuitor.py", "plot", str(done / "metrics.jsonl"), str(readonly / "curves.png"))
        assert_one_error_line(p, f"cannot write {readonly / 'curves.png'} (Read-only file system")


# ----------------------------------------------------------------------------- changed inputs under --resume
def test_resume_refuses_a_changed_model_or_dataset(tiny_dir, tmp_path, tokenizer):
    model, dataset = tmp_path / "model", tmp_path / "data.jsonl"
    shutil.copytree(tiny_dir, model)
    shutil.copy(DATA, dataset)
    out = tmp_path / "run"

    def run(*extra):
        argv = run_args(str(model), out, "--max_steps", "3", "--save_steps", "1", *extra)
        argv[argv.index("--dataset") + 1] = str(dataset)
        return script("intuitor.py", *argv)

    assert run().returncode == 0
    make_model(tokenizer, seed=7, head_scale=8.0).save_pretrained(model)  # other weights, same architecture
    assert_one_error_line(run("--resume"), "--resume: --model (model.safetensors) changed since the run began")
    shutil.rmtree(model)
    shutil.copytree(tiny_dir, model)  # restored: the same bytes again
    dataset.write_text(dataset.read_text().replace("What", "Which", 1))
    assert_one_error_line(run("--resume"), "--resume: --dataset (data.jsonl) changed since the run began")
    shutil.copy(DATA, dataset)
    assert run("--resume").returncode == 0


def test_fingerprints_sample_large_files(tmp_path):
    big = tmp_path / "w.bin"
    big.write_bytes(os.urandom(8 << 20))
    a = runs.file_fingerprint(big)
    with open(big, "r+b") as f:  # one byte in the middle block
        f.seek(4 << 20)
        f.write(bytes([f.read(1)[0] ^ 1]))
    assert runs.file_fingerprint(big) != a and a.startswith(f"{8 << 20}:")
    assert runs.fingerprint("Qwen/Qwen2.5-1.5B") is None  # a hub id: not a local file


# ----------------------------------------------------------------------------- input that is not what it claims
def test_a_dataset_that_is_not_utf8_is_one_line(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    data = b'{"problem": "What is 1 + 1?"}\n{"problem": "caf\xe9 \xff"}\n'  # Latin-1, not UTF-8
    bad.write_bytes(data)
    p = small_run(tiny_dir, tmp_path / "run", "--dataset", str(bad), check=False)
    assert_one_error_line(p, f"byte {data.index(0xE9)} is not UTF-8 text; re-save the file as UTF-8")
    e = script("eval.py", "--model", tiny_dir, "--benchmark", "gsm8k", "--data", str(bad))
    assert_one_error_line(e, "--data")


def test_a_tokenizer_without_eos_or_pad_and_a_vocabulary_mismatch(tmp_path):
    tok = make_tokenizer()
    model = make_model(tok, head_scale=8.0)
    no_end = tmp_path / "no_end"
    model.save_pretrained(no_end)
    tok.eos_token, tok.pad_token = None, None
    tok.save_pretrained(no_end)
    config = json.loads((no_end / "config.json").read_text())
    config.update(eos_token_id=None, pad_token_id=None)
    (no_end / "config.json").write_text(json.dumps(config))
    p = small_run(str(no_end), tmp_path / "a", check=False)
    assert_one_error_line(p, "its tokenizer has neither an eos nor a pad token")
    assert "memory plan" not in p.stdout + p.stderr  # before the model loads
    small = tmp_path / "small"
    lm = make_model(make_tokenizer(), head_scale=8.0)
    lm.resize_token_embeddings(290)  # a model of another vocabulary than its tokenizer's
    lm.save_pretrained(small)
    make_tokenizer().save_pretrained(small)
    p = small_run(str(small), tmp_path / "b", check=False)
    assert_one_error_line(p, "its tokenizer has 300 tokens but the model embeds only 290")


def test_resume_from_an_unreadable_checkpoint_names_a_fix_that_works(tiny_dir, tmp_path):
    out = tmp_path / "run"
    small_run(tiny_dir, out, "--max_steps", "2", "--save_steps", "1")
    (out / "checkpoint-2" / "model.safetensors").write_bytes(b"torn")
    p = small_run(tiny_dir, out, "--max_steps", "2", "--resume_from_checkpoint", str(out / "checkpoint-2"),
                  check=False)  # fmt: skip
    assert_one_error_line(p, "pass another checkpoint-N folder, or --resume alone for the newest readable one")
    assert "trying the one before" not in p.stdout + p.stderr
    small_run(tiny_dir, out, "--max_steps", "2", "--resume")  # the fix named: the newest readable one, step 1


def test_a_damaged_metrics_line_stops_resume_before_the_model_loads(tiny_dir, tmp_path):
    out = tmp_path / "run"
    small_run(tiny_dir, out, "--max_steps", "2", "--save_steps", "1")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("{broken\n" + lines[1] + "\n")
    p = small_run(tiny_dir, out, "--max_steps", "2", "--resume", check=False)
    assert_one_error_line(p, "line 1 of 2 is not a step record")
    assert "memory plan" not in p.stdout + p.stderr


def test_plot_of_records_without_self_certainty(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/accuracy": s / 10}) + "\n" for s in (1, 2, 3)))
    p = script("intuitor.py", "plot", str(path))
    assert p.returncode == 0 and (tmp_path / "metrics.png").exists(), p.stderr
    path.write_text("".join(json.dumps({"step": s, "other/metric": s}) + "\n" for s in (1, 2)))
    assert_one_error_line(script("intuitor.py", "plot", str(path)), "none of the plotted metrics is logged")


# ----------------------------------------------------------------------------- logs and long prompts
def test_a_redirected_log_holds_one_line_per_step_and_no_library_bars(tiny_dir, tmp_path):
    argv = run_args(tiny_dir, tmp_path / "run", "--max_steps", "3", "--save_steps", "1")
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "intuitor.py"), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=OFFLINE,
    )  # fmt: skip  (the log idiom: > log 2>&1)
    assert p.returncode == 0, p.stdout[-2000:]
    for bar in ("\r", "it/s", "Generating train split", "Loading weights", "Writing model shards", "Warning"):
        assert bar not in p.stdout, (bar, p.stdout[-2000:])
    assert [line.split(" |")[0] for line in p.stdout.splitlines() if line.startswith("step ")] == [
        "step 1/3", "step 2/3", "step 3/3"]  # fmt: skip


def test_a_huge_prompt_is_skipped_without_being_tokenised(tokenizer, monkeypatch):
    seen = []
    tokenize = I.tokenize_prompt
    monkeypatch.setattr(I, "tokenize_prompt", lambda t, q, s, f="chat": seen.append(len(q)) or tokenize(t, q, s, f))
    huge = "x" * 10_000_000
    prompts, skipped = I.make_prompts(["What is 2 + 3?", huge], [None, None], tokenizer, "", 512)
    assert len(prompts) == 1 and skipped == 1 and max(seen) < 100
