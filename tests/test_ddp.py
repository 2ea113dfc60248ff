"""torch.distributed on CPU (gloo, 2 processes): the same program as one process, proven by its weights."""

import json
import os
import shutil

import pytest
import torch
from conftest import DATA, ROOT, torchrun

WORKER = os.path.join(ROOT, "tests", "ddp_worker.py")


def train_args(model, out, *extra):
    return [
        "--model",
        model,
        "--dataset",
        DATA,
        "--prompts_per_step",
        "4",
        "--num_generations",
        "3",
        "--max_completion_length",
        "10",
        "--micro_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--output_dir",
        str(out),
        *extra,
    ]


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_two_ranks_stay_bit_identical(tiny_dir, tmp_path):
    p = torchrun(2, WORKER, "train", str(tmp_path), *train_args(tiny_dir, tmp_path, "--max_steps", "3"))
    assert "FutureWarning" not in p.stdout + p.stderr  # no deprecated call of the project's own (DDP's buffers)
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    init = torch.load(tmp_path / "rank0.pt")  # and they did move
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    assert any(not torch.equal(init[k], start[k]) for k in init)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]  # rank 0 alone writes


@pytest.mark.parametrize("loss_type,head", [("token", "untied"), ("grpo", "untied"), ("token", "tied")])
def test_one_step_from_fixed_rollouts_equals_single_process(tiny_dir, tied_dir, tmp_path, loss_type, head):
    """Tied: the streamed head's gradient and the embedding's dense one meet in one .grad, reduced once."""
    model = tied_dir if head == "tied" else tiny_dir
    os.environ["LOSS_TYPE"] = loss_type
    try:
        torchrun(1, WORKER, "update", str(tmp_path / "w1.pt"), model)
        torchrun(2, WORKER, "update", str(tmp_path / "w2.pt"), model)
    finally:
        del os.environ["LOSS_TYPE"]
    w1, w2 = torch.load(tmp_path / "w1.pt"), torch.load(tmp_path / "w2.pt")
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff <= 1e-6, diff


def test_checkpoints_move_between_world_sizes(tiny_dir, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun(2, WORKER, "train", str(tmp_path), *train_args(tiny_dir, two, "--max_steps", "4", "--save_steps", "2"))
    torchrun(1, WORKER, "train", str(tmp_path), *train_args(tiny_dir, one, "--max_steps", "4", "--save_steps", "2"))
    for src, nproc, dst in ((two, 1, tmp_path / "two_to_one"), (one, 2, tmp_path / "one_to_two")):
        os.makedirs(dst)
        shutil.copytree(src / "checkpoint-2", dst / "checkpoint-2")
        torchrun(
            nproc,
            WORKER,
            "train",
            str(tmp_path),
            *train_args(tiny_dir, dst, "--max_steps", "4", "--save_steps", "2", "--resume"),
        )
        resumed = metrics(dst)
        assert [r["step"] for r in resumed] == [3, 4]
        assert [r["train/lr"] for r in resumed] == [r["train/lr"] for r in metrics(src)[2:]]  # schedule restored
        assert (dst / "checkpoint-4" / "model.safetensors").exists()


def test_prompts_per_step_must_divide_by_world_size(tiny_dir, tmp_path):
    p = torchrun(
        2,
        os.path.join(ROOT, "intuitor.py"),
        *train_args(tiny_dir, tmp_path / "x", "--prompts_per_step", "3"),
        check=False,
    )
    assert p.returncode != 0
    assert p.stderr.count("error: --prompts_per_step (3) must be a positive multiple of the world size (2)") == 1
    assert not (tmp_path / "x").exists()


def test_a_check_failing_on_rank_0_alone_stops_every_rank(tiny_dir, tmp_path):
    """The output directory is checked (and locked) by rank 0 alone. Launched without torchrun, which would kill
    the survivors: rank 1 must learn the verdict and stop, not wait for a rank that has exited."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "file").write_text("not a directory")
    argv = [sys.executable, os.path.join(ROOT, "intuitor.py"), *train_args(tiny_dir, tmp_path / "file")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1")  # fmt: skip
    ranks = [subprocess.Popen(argv, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]  # fmt: skip
    try:
        errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [1, 1]
    assert errors[0].strip() == f"error: --output_dir {str(tmp_path / 'file')!r} is a file; pass a directory"
    assert "error:" not in errors[1]
