"""Never lose or corrupt a run: every bad input is one error line before anything is written, NaN never reaches
a checkpoint, one run per output directory, resume refuses a different run and survives a corrupt checkpoint."""

import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import DATA, ROOT
from test_intuitor import metrics, small_run

import intuitor as I
from intuitor_harness import process

OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def script(name, *argv, env=OFFLINE):
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *argv], capture_output=True, text=True, env=env)


def assert_one_error_line(p, needle):
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(errors) == 1 and needle in errors[0], p.stderr[-3000:]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def bad_datasets(tmp):
    """name -> a local dataset file that must be refused with one line."""
    return {
        "empty": write_lines(tmp / "empty.jsonl", []),
        "malformed": write_lines(tmp / "malformed.jsonl", ['{"problem": "What is 1 + 1?"}', '{"problem": ']),
        "csv": write_lines(tmp / "data.csv", ["problem", "What is 1 + 1?"]),
        "null": write_lines(tmp / "null.jsonl", [json.dumps({"problem": None})] * 4),
        "number": write_lines(tmp / "number.jsonl", [json.dumps({"problem": i}) for i in range(4)]),
        "under_a_file": str(write_lines(tmp / "a_file", ["x"])) + "/run",
    }


TRAIN_CASES = [
    (["--learning_rate", "nan"], "--learning_rate"),
    (["--learning_rate", "inf"], "--learning_rate"),
    (["--learning_rate", "-1"], "--learning_rate"),
    (["--beta", "-1"], "--beta"),
    (["--temperature", "0"], "--temperature"),
    (["--epsilon", "1.5"], "--epsilon"),
    (["--warmup_ratio", "2"], "--warmup_ratio"),
    (["--max_grad_norm", "0"], "--max_grad_norm"),
    (["--weight_decay", "nan"], "--weight_decay"),
    (["--max_steps", "0"], "--max_steps"),
    (["--save_steps", "-1"], "--save_steps"),
    (["--save_total_limit", "-1"], "--save_total_limit"),
    (["--micro_batch_size", "0"], "--micro_batch_size"),
    (["--max_prompt_length", "0"], "--max_prompt_length"),
    (["--generation_batch_size", "3"], "--generation_batch_size"),
    (["--num_generations", "1"], "--num_generations"),
    (["--reward", "accuracy=x"], "--reward"),
    (["--device", "gpu"], "--device"),
    (["--lr", "1e-5"], "--lr"),
    (["--learning_rate"], "--learning_rate"),
    (["--resume", "--overwrite_output_dir"], "--overwrite_output_dir"),
    (["--model", "./no/such/model"], "--model"),
    (["--dataset", "/no/such/file.jsonl"], "no such file"),
    (["--prompt_column", "question"], "--prompt_column"),
    (["--prompts_per_step", "100"], "--prompts_per_step"),
    *[(["--dataset", name], "--dataset") for name in ("empty", "malformed", "csv", "null", "number")],
    (["--num_generations", "0"], "--num_generations"),
    (["--top_k", "-1"], "--top_k"),
    (["--top_p", "0"], "--top_p"),
    (["--top_p", "1.5"], "--top_p"),
    (["--top_p", "nan"], "--top_p"),
    (["--reward", "self_certainty=nan"], "--reward"),
    (["--reward", "self_certainty=0"], "every weight is 0"),
    (["--max_prompt_length", "3"], "raise --max_prompt_length"),
    (["--output_dir", "under_a_file"], "cannot be created"),
    (["--output_dir", "/proc/intuitor-run"], "cannot be created"),
]
if not torch.cuda.is_available():
    TRAIN_CASES.append((["--device", "cuda"], "--device cpu"))


@pytest.mark.parametrize("argv,needle", TRAIN_CASES, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_training_input_is_one_error_line_and_writes_nothing(tiny_dir, tmp_path, argv, needle):
    datasets = bad_datasets(tmp_path)
    argv = [datasets.get(x, x) for x in argv]
    out = tmp_path / "out"
    base = ["--model", tiny_dir, "--dataset", DATA, "--output_dir", str(out), "--prompts_per_step", "2"]
    p = script("intuitor.py", *base, "--num_generations", "4", "--max_completion_length", "8", *argv)
    assert_one_error_line(p, needle)
    assert not out.exists()


def test_output_dir_that_is_a_file(tiny_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    p = script("intuitor.py", "--model", tiny_dir, "--dataset", DATA, "--output_dir", str(tmp_path / "file"))
    assert_one_error_line(p, "is a file")


def test_unreachable_hub_fails_fast_with_the_offline_hint(tmp_path):
    env = {k: v for k, v in OFFLINE.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: the hub is unreachable
    t0 = time.time()
    p = script("intuitor.py", "--model", "some-org/some-model", "--dataset", DATA, "--output_dir", str(tmp_path / "o"),
               env=env)  # fmt: skip
    assert_one_error_line(p, "hub is unreachable and --model 'some-org/some-model' is not in the local cache")
    assert "docs/data.md" in p.stderr and "HF_HUB_OFFLINE" not in p.stderr  # nothing points back at the hub
    assert time.time() - t0 < 60  # seconds, not minutes of retries (generous bound for a loaded CI machine)


EVAL_CASES = [
    (["--limit", "-1"], "--limit"),
    (["--n", "0"], "--n"),
    (["--n", "4"], "--temperature"),
    (["--bogus", "1"], "--bogus"),
    (["--benchmark", "aime"], "--benchmark"),
    (["--data", "no_gold"], "gold"),
    (["--data", "no_question"], "--data"),
    (["--data", "/no/such/file.jsonl"], "--data"),
]


@pytest.mark.parametrize("argv,needle", EVAL_CASES, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_eval_input_is_one_error_line(tiny_dir, tmp_path, argv, needle):
    files = {"no_gold": write_lines(tmp_path / "no_gold.jsonl", [json.dumps({"question": "What is 1 + 1?"})]),
             "no_question": write_lines(tmp_path / "no_q.jsonl", [json.dumps({"answer": "#### 2"})])}  # fmt: skip
    argv = [files.get(x, x) for x in argv]
    data = ["--data", os.path.join(ROOT, "tests", "data", "gsm8k_tiny.jsonl")] if "--data" not in argv else []
    p = script("eval.py", "--model", tiny_dir, "--benchmark", "gsm8k", *data, "--output", str(tmp_path / "r.jsonl"),
               "--max_new_tokens", "4", *argv)  # fmt: skip
    assert_one_error_line(p, needle)
    assert not (tmp_path / "r.jsonl").exists()


def test_eval_without_model_says_it_is_required():
    assert_one_error_line(script("eval.py"), "required: --model")


# ---------------------------------------------------------------- non-finite values never reach a checkpoint
def test_diverging_run_stops_and_no_checkpoint_holds_a_non_finite_value(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    p = small_run(tiny_dir, tmp_path, "--max_steps", "6", "--save_steps", "1", "--save_total_limit", "0",
                  "--learning_rate", "1e30", check=False)  # fmt: skip
    assert_one_error_line(p, "--learning_rate")
    for name in os.listdir(tmp_path):
        if name.startswith("checkpoint-"):
            weights = load_file(tmp_path / name / "model.safetensors")
            assert all(torch.isfinite(w).all() for w in weights.values()), name


def test_non_finite_gradient_never_reaches_the_weights(tokenizer, tmp_path):
    from conftest import make_model

    lm = make_model(tokenizer, seed=6, head_scale=4.0)
    torch.manual_seed(7)
    prompts = [tokenizer(t).input_ids for t in ("What is 2 + 3?", "Let x = 4.")]
    rollouts = I.sample(lm, prompts, 3, 8, 1.0, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    for r in rollouts:
        r.advantage = float("nan")  # a NaN reward's advantage: loss and gradient are NaN
    before = [p.detach().clone() for p in lm.parameters()]
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    config = I.Args(
        beta=0.0,
        micro_batch_size=3,
        num_iterations=2,
        max_grad_norm=1.0,
    )
    update = I.optimize(
        I.CompletionLogProbs(lm, 1.0, 8, 64), None, opt, sched, rollouts, tokenizer.pad_token_id, config
    )
    assert update["skipped_updates"] == 2 and not math.isfinite(update["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(before, lm.parameters()))  # weights untouched


# ---------------------------------------------------------------- one run per output directory
def test_fresh_run_refuses_a_directory_holding_a_run_unless_overwrite(tiny_dir, tmp_path):
    small_run(tiny_dir, tmp_path, "--max_steps", "3", "--save_steps", "1")
    assert_one_error_line(small_run(tiny_dir, tmp_path, "--max_steps", "2", check=False), "--overwrite_output_dir")
    small_run(tiny_dir, tmp_path, "--max_steps", "2", "--save_steps", "0", "--overwrite_output_dir")
    assert sorted(d for d in os.listdir(tmp_path)) == ["checkpoint-2", "metrics.jsonl"]  # nothing of the old run
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]


def test_second_run_on_a_directory_in_use_fails_fast(tiny_dir, tmp_path):
    os.makedirs(tmp_path / "out")
    holder = os.open(tmp_path / "out", os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running run holds
    try:
        assert_one_error_line(small_run(tiny_dir, tmp_path / "out", "--max_steps", "1", check=False), "in use")
    finally:
        os.close(holder)
    assert os.listdir(tmp_path / "out") == []


def test_resume_refuses_a_different_run_and_another_schedule_length(tiny_dir, tmp_path):
    """--max_steps sets the cosine schedule's length: resumed with another value, the learning rate would jump
    (a 2-step run resumed to 4 would train its step 3 at lr 0). Refused, with the flags that differ."""
    small_run(tiny_dir, tmp_path, "--max_steps", "2", "--save_steps", "1")
    p = small_run(tiny_dir, tmp_path, "--max_steps", "2", "--resume", "--seed", "7", "--num_generations", "2",
                  check=False)  # fmt: skip
    assert_one_error_line(p, "--seed 42 -> 7")
    assert "--num_generations 4 -> 2" in p.stderr
    for longer_or_shorter in ("4", "1"):
        p = small_run(tiny_dir, tmp_path, "--max_steps", longer_or_shorter, "--resume", check=False)
        assert_one_error_line(p, f"--max_steps 2 -> {longer_or_shorter}")
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]  # nothing lost
    p = small_run(tiny_dir, tmp_path, "--max_steps", "2", "--save_steps", "1", "--resume")  # the same: allowed
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2] and "done:" in p.stdout


def test_resume_falls_back_past_a_corrupt_checkpoint_and_ignores_stray_folders(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    small_run(
        tiny_dir, a, "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-3", "--save_total_limit", "0"
    )
    shutil.copytree(a, b)
    state = b / "checkpoint-4" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # torn while being written
    os.makedirs(b / "checkpoint-6.bak")  # a folder a user left behind
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # a torn last line
    p = small_run(tiny_dir, b, "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-3", "--save_total_limit",
                  "0", "--resume")  # fmt: skip
    assert "checkpoint-4 is unreadable" in p.stdout + p.stderr and "resumed from" in p.stdout + p.stderr
    assert "checkpoint-2" in (p.stdout + p.stderr).split("resumed from")[1].splitlines()[0]
    assert [r["step"] for r in metrics(b)] == [1, 2, 3, 4]
    wa, wb = load_file(a / "checkpoint-4" / "model.safetensors"), load_file(b / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the redone steps equal the lost ones


def test_checkpoints_rotate_and_replace_without_a_gap(tiny_dir, tmp_path):
    small_run(tiny_dir, tmp_path, "--max_steps", "4", "--save_steps", "1", "--save_total_limit", "2")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-4", "metrics.jsonl"]


# ---------------------------------------------------------------- numerics
def test_equal_rewards_give_exactly_zero_advantage():
    rewards = torch.full((7,), 5.3, dtype=torch.float32)  # the group mean rounds to one ulp off 5.3
    assert torch.equal(I.group_advantages(rewards, 7), torch.zeros(7))
    mixed = torch.tensor([5.3] * 7 + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert torch.equal(I.group_advantages(mixed, 7)[:7], torch.zeros(7))
    assert (I.group_advantages(mixed, 7)[7:] != 0).sum() == 6  # 1..7: only the middle one is at the mean


def test_self_certainty_keeps_float64():
    torch.manual_seed(0)
    logits = torch.randn(3, 1000, dtype=torch.float64) * 5
    sc = I.self_certainty(logits)
    assert sc.dtype == torch.float64
    reference = torch.logsumexp(logits, -1) - logits.mean(-1) - math.log(1000)
    assert torch.equal(sc, reference)


# ---------------------------------------------------------------- the memory plan
def test_memory_plan_by_hand_for_the_papers_shape():
    """Qwen2.5-1.5B's shape (1.54B parameters, hidden 1536, 28 layers, MLP 8960, 12 query and 2 KV heads of 128,
    vocabulary 151936 tied to the head) at the paper's per-rank shape on 8 ranks: 16 prompts x 7 sequences of
    512 + 3072 tokens, micro-batch 4."""
    from types import SimpleNamespace

    config = SimpleNamespace(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)  # fmt: skip
    args = I.Args()
    P, E, GiB = 1_543_714_304, 151936 * 1536, 2**30
    plan = process.memory_plan(config, P, args, world_size=8, bf16=True)
    assert plan["weights (fp32)"] == pytest.approx(4 * P / GiB) and plan["AdamW moments"] == pytest.approx(8 * P / GiB)
    assert plan["reference"] == pytest.approx((2 * P + 2 * E) / GiB)  # bf16 matmuls, fp32 embedding
    # K and V, 28 layers x 2 heads x 128 x 2 bytes, for 112 sequences x 3584 tokens
    assert plan["KV cache (sampling)"] == pytest.approx(28 * 2 * 2 * 128 * 2 * 112 * 3584 / GiB)
    assert plan["autocast weight copies (sampling)"] == plan["autocast weight copies (update)"] == 2 * P / GiB
    # per token and layer: 30 x 1536 + 4 x 256 + 8 x 8960 + 4 x 12 + 8 = 118840 bytes
    assert plan["activations (update)"] == pytest.approx(28 * 118840 * 4 * 3584 / GiB)
    assert plan["tied embedding gradient (update)"] == pytest.approx(4 * E / GiB)
    update = (4 * P + 2 * P + 4 * E) / GiB + plan["activations (update)"]
    sampling = plan["KV cache (sampling)"] + 2 * P / GiB
    assert plan["peak"] == pytest.approx((14 * P + 2 * E) / GiB + max(sampling, update))
    assert 74 < plan["peak"] < 75  # not 62.2, as the plan said before it counted autocast and the tied gradient
    checkpointed = process.memory_plan(config, P, I.Args(gradient_checkpointing=True), world_size=8)
    assert checkpointed["activations (update)"] == pytest.approx((28 * 4 * 1536 + 118840) * 4 * 3584 / GiB)
    assert process.memory_plan(config, P, I.Args(beta=0.0), world_size=8)["reference"] == 0
    fp32 = process.memory_plan(config, P, args, world_size=8, bf16=False)
    assert fp32["reference"] == 4 * P / GiB and fp32["autocast weight copies (update)"] == 0


def test_a_plan_that_cannot_fit_is_one_error_line_naming_the_flags(capsys):
    from intuitor_harness import process

    plan = {"weights (fp32)": 1.0, "peak": 1e9}
    with pytest.raises(SystemExit) as stop:
        process.check_memory(plan, process.Runtime())
    message = str(stop.value)
    assert message.startswith("error:") and "\n" not in message
    for flag in ("--generation_batch_size", "--micro_batch_size", "--gradient_checkpointing"):
        assert flag in message
    assert "memory plan per rank" in capsys.readouterr().out
    process.check_memory({"weights (fp32)": 1.0, "peak": 0.001}, process.Runtime())  # fits: no error


# ---------------------------------------------------------------- second round: faults and formats
def test_two_fresh_runs_on_one_new_directory_cannot_both_write_there(tmp_path):
    """Run A checks a new directory, then loads its model; meanwhile run B claims the directory and writes a
    step. When A claims it, the earlier-run check is repeated under the lock: A stops, B's run is intact."""
    from intuitor_harness import runs

    out = tmp_path / "new"
    a = runs.RunDirectory(str(out), resume=False, overwrite=False)  # checked: nothing there yet
    b = runs.RunDirectory(str(out), resume=False, overwrite=False)
    b.open(0)
    with open(b.metrics_path, "a") as f:
        f.write(json.dumps({"step": 1}) + "\n")
    with pytest.raises(SystemExit) as stop:
        a.open(0)
    assert "in use by another run" in str(stop.value)
    os.close(b.lock)  # B has finished: A must still not replace its run
    with pytest.raises(SystemExit) as stop:
        a.open(0)
    assert "holds an earlier run" in str(stop.value)
    assert json.loads((out / "metrics.jsonl").read_text()) == {"step": 1}


def test_a_damaged_model_is_one_error_line(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    for model in (broken, fake):
        p = script("intuitor.py", "--model", str(model), "--dataset", DATA, "--output_dir", str(tmp_path / "out"),
                   "--prompts_per_step", "2")  # fmt: skip
        assert_one_error_line(p, "cannot load --model")


def test_resume_refuses_a_damaged_metrics_line_and_loses_nothing(tiny_dir, tmp_path):
    small_run(tiny_dir, tmp_path, "--max_steps", "4", "--save_steps", "2")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]  # step 2, garbled
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = (tmp_path / "metrics.jsonl").read_text()
    p = small_run(tiny_dir, tmp_path, "--max_steps", "4", "--save_steps", "2", "--resume", check=False)
    assert_one_error_line(p, "line 2 of 4")
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_leftovers_of_a_crashed_save_are_removed_and_checkpoint_files_share_one_mode(tiny_dir, tmp_path):
    small_run(tiny_dir, tmp_path, "--max_steps", "2", "--save_steps", "1")
    os.makedirs(tmp_path / ".tmp-checkpoint-3-12345")  # what a kill during a save leaves behind
    (tmp_path / ".tmp-checkpoint-3-12345" / "model.safetensors").write_bytes(b"half")
    p = small_run(tiny_dir, tmp_path, "--max_steps", "2", "--resume")
    assert "removing .tmp-checkpoint-3-12345" in p.stdout
    assert not (tmp_path / ".tmp-checkpoint-3-12345").exists()
    modes = {name: os.stat(tmp_path / "checkpoint-2" / name).st_mode & 0o777
             for name in os.listdir(tmp_path / "checkpoint-2")}  # fmt: skip
    assert len(set(modes.values())) == 1, modes


def test_metrics_are_strict_json(tmp_path):
    from intuitor_harness import runs, watch

    path = str(tmp_path / "metrics.jsonl")
    watch.log_step(path, {"step": 1, "monitor/certainty_auroc": float("nan"), "train/loss": float("inf")}, 1)
    line = open(path).read()
    assert "NaN" not in line and "Infinity" not in line and json.loads(line)["monitor/certainty_auroc"] is None
    assert math.isnan(runs.read_metrics(path)[0]["monitor/certainty_auroc"])


PLOT_CASES = {
    "empty": (b"", "no step records"),
    "middle line": (b'{"step": 1, "train/loss": 1.0}\n{"step": 2, "tr\n{"step": 3, "train/loss": 1.0}\n', "line 2"),
    "binary": (bytes(range(256)) * 4, "not a readable metrics.jsonl"),
    "not a number": (b'{"step": 1, "train/loss": "high"}\n', "not a number"),
}


@pytest.mark.parametrize("case", PLOT_CASES)
def test_plot_of_a_bad_metrics_file_is_one_error_line(tmp_path, case):
    content, needle = PLOT_CASES[case]
    (tmp_path / "metrics.jsonl").write_bytes(content)
    assert_one_error_line(script("intuitor.py", "plot", str(tmp_path / "metrics.jsonl")), needle)


def test_plot_output_path_is_checked_and_equal_run_names_are_told_apart(tmp_path):
    from intuitor_harness import watch

    metrics_file = tmp_path / "a" / "run" / "metrics.jsonl"
    os.makedirs(metrics_file.parent)
    metrics_file.write_text(json.dumps({"step": 1, "train/self_certainty": 1.0}) + "\n")
    for out in (tmp_path, tmp_path / "missing" / "plot.png"):
        os.makedirs(tmp_path / "dir.png", exist_ok=True)
        target = tmp_path / "dir.png" if out == tmp_path else out
        assert_one_error_line(script("intuitor.py", "plot", str(metrics_file), str(target)), "existing folder")
    assert watch.run_labels(["x/a/run/metrics.jsonl", "x/b/run/metrics.jsonl"]) == ["a/run", "b/run"]
    assert watch.run_labels(["x/a/metrics.jsonl", "x/b/metrics.jsonl"]) == ["a", "b"]


def test_eval_checks_and_claims_its_output_before_sampling(tiny_dir, tmp_path):
    gsm = os.path.join(ROOT, "tests", "data", "gsm8k_tiny.jsonl")
    base = ["--model", tiny_dir, "--benchmark", "gsm8k", "--data", gsm, "--max_new_tokens", "4", "--limit", "2"]
    (tmp_path / "a_file").write_text("x")
    for output, needle in ((tmp_path, "is a directory"), (tmp_path / "a_file" / "r.jsonl", "cannot be written")):
        assert_one_error_line(script("eval.py", *base, "--output", str(output)), needle)
    first = script("eval.py", *base, "--output", str(tmp_path / "r.jsonl"))
    assert first.returncode == 0 and "gsm8k: 2 / 2 problems" in first.stdout  # a redirected log shows progress
    kept = (tmp_path / "r.jsonl").read_text()
    again = script("eval.py", *base, "--output", str(tmp_path / "r.jsonl"))
    assert_one_error_line(again, "--overwrite")
    assert (tmp_path / "r.jsonl").read_text() == kept
    assert script("eval.py", *base, "--output", str(tmp_path / "r.jsonl"), "--overwrite").returncode == 0
    (tmp_path / "notes.jsonl").write_text("not json\n")
    assert_one_error_line(script("eval.py", "compare", str(tmp_path / "notes.jsonl")), "not per-problem records")
