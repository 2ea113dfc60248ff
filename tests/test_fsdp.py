"""FSDP2 on CPU (gloo, 2 processes): sharded weights, gradients and AdamW state compute what one process does,
resume exactly, and move to and from DDP; the streamed lm_head never holds a tokens x vocabulary tensor."""

import os
import shutil

import pytest
import torch
from conftest import ROOT, torchrun
from test_ddp import WORKER, metrics, train_args

from intuitor_harness import process


@pytest.mark.parametrize("head", ["untied", "tied"])
def test_one_fsdp_step_from_fixed_rollouts_equals_single_process(tiny_dir, tied_dir, tmp_path, head):
    model = tied_dir if head == "tied" else tiny_dir
    torchrun(1, WORKER, "update", str(tmp_path / "one.pt"), model)
    os.environ["PARALLEL"] = "fsdp"
    try:
        torchrun(2, WORKER, "update", str(tmp_path / "fsdp.pt"), model)
    finally:
        del os.environ["PARALLEL"]
    one, fsdp = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "fsdp.pt")
    assert one.keys() == fsdp.keys()
    diff = max((one[k] - fsdp[k]).abs().max().item() for k in one)
    assert diff <= 1e-6, diff


def weights(checkpoint):
    from safetensors.torch import load_file

    return load_file(os.path.join(checkpoint, "model.safetensors"))


def test_fsdp_training_resumes_exactly_and_moves_to_and_from_ddp(tiny_dir, tmp_path):
    fsdp = ("--parallel", "fsdp")
    steps = ("--max_steps", "3", "--save_steps", "1", "--save_total_limit", "0")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    torchrun(2, WORKER, "train", str(tmp_path), *train_args(tiny_dir, whole, *steps, *fsdp))
    assert [r["step"] for r in metrics(whole)] == [1, 2, 3]
    os.makedirs(cut)
    shutil.copytree(whole / "checkpoint-2", cut / "checkpoint-2")  # what a run stopped after step 2 leaves
    torchrun(2, WORKER, "train", str(tmp_path), *train_args(tiny_dir, cut, *steps, *fsdp, "--resume"))
    a, b = weights(whole / "checkpoint-3"), weights(cut / "checkpoint-3")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert [r["train/lr"] for r in metrics(cut)] == [r["train/lr"] for r in metrics(whole)[2:]]

    # the same checkpoint-2 continued under DDP (and a DDP checkpoint under FSDP) reaches the same step 3
    to_ddp, to_fsdp, ddp = tmp_path / "to_ddp", tmp_path / "to_fsdp", tmp_path / "ddp"
    os.makedirs(to_ddp)
    shutil.copytree(whole / "checkpoint-2", to_ddp / "checkpoint-2")
    torchrun(2, WORKER, "train", str(tmp_path), *train_args(tiny_dir, to_ddp, *steps, "--resume"))
    torchrun(2, WORKER, "train", str(tmp_path), *train_args(tiny_dir, ddp, *steps))
    os.makedirs(to_fsdp)
    shutil.copytree(ddp / "checkpoint-2", to_fsdp / "checkpoint-2")
    torchrun(2, WORKER, "train", str(tmp_path), *train_args(tiny_dir, to_fsdp, *steps, *fsdp, "--resume"))
    for moved, reference in ((to_ddp, whole), (to_fsdp, ddp)):
        x, y = weights(moved / "checkpoint-3"), weights(reference / "checkpoint-3")
        assert max((x[k] - y[k]).abs().max().item() for k in x) <= 1e-6
        assert [r["step"] for r in metrics(moved)] == [3]


def test_fsdp_needs_torchrun_and_the_eager_sampler(tiny_dir, tmp_path):
    from test_intuitor import small_run

    p = small_run(tiny_dir, tmp_path / "a", "--parallel", "fsdp", check=False)
    assert p.returncode == 1 and p.stderr.strip().startswith("error: --parallel fsdp runs under torchrun")
    p = torchrun(1, os.path.join(ROOT, "intuitor.py"), *train_args(tiny_dir, tmp_path / "b", "--parallel", "fsdp",
                 "--sampler", "static"), check=False)  # fmt: skip
    assert p.returncode != 0 and "error: --parallel fsdp --sampler static samples from a full copy" in p.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_memory_plan_shards_what_fsdp_shards():
    from types import SimpleNamespace

    import intuitor as I

    config = SimpleNamespace(
        hidden_size=3584,
        num_hidden_layers=28,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    )  # Qwen2.5-7B
    P, GiB = 7_615_616_512, 2**30
    ddp = process.memory_plan(config, P, I.Args(gradient_checkpointing=True), world_size=8)
    fsdp = process.memory_plan(config, P, I.Args(gradient_checkpointing=True, parallel="fsdp"), world_size=8)
    assert fsdp["weights (fp32)"] == pytest.approx(4 * P / 8 / GiB) and fsdp["AdamW moments"] == pytest.approx(
        8 * P / 8 / GiB
    )
    assert fsdp["gradients (update)"] == pytest.approx(4 * P / 8 / GiB)
    assert fsdp["reference"] == pytest.approx(4 * P / 8 / GiB)  # fp32 shards
    assert fsdp["unsharded weights (sampling)"] == pytest.approx(4 * P * 7 / 8 / GiB)  # the other ranks' shards
    assert fsdp["KV cache (sampling)"] == ddp["KV cache (sampling)"]
    assert fsdp["peak"] < 80 < ddp["peak"]


def test_streamed_head_under_fsdp_never_makes_a_tokens_by_vocabulary_tensor(tiny_dir, tmp_path):
    """Every tensor with a vocabulary dimension that any op makes in forward and backward, on a sharded tiny model
    with 400 completion tokens: the largest is the weight-sized head gradient handed back to FSDP, never the
    400 x V logits."""
    torchrun(2, WORKER, "tiles", str(tmp_path / "tiles.pt"), tiny_dir)
    sizes = torch.load(tmp_path / "tiles.pt")
    assert sizes["largest"] <= sizes["weight"] < sizes["logits"], sizes


def test_fsdp_with_checkpointing_offline_certainty_and_a_bf16_sampling_copy(tiny_dir, tmp_path):
    flags = ("--parallel", "fsdp", "--max_steps", "2", "--gradient_checkpointing", "--certainty_model", "reference",
             "--sampling_weights", "bf16", "--dtype", "bfloat16")  # fmt: skip
    torchrun(2, WORKER, "train", str(tmp_path), *train_args(tiny_dir, tmp_path / "out", *flags))
    records = metrics(tmp_path / "out")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["train/kl"] == 0.0  # the sharded reference is the policy at step 0
    assert all(r["train/skipped_updates"] == 0 and r["train/grad_norm"] > 0 for r in records)
    assert records[1]["train/reward/self_certainty"] != records[1]["train/self_certainty"]  # offline scorer


def test_fsdp_run_that_diverges_stops_before_a_non_finite_checkpoint(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    flags = ("--parallel", "fsdp", "--max_steps", "4", "--save_steps", "1", "--learning_rate", "1e30")
    p = torchrun(2, WORKER, "train", str(tmp_path), *train_args(tiny_dir, tmp_path / "out", *flags), check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode != 0 and len(errors) == 1 and "lower --learning_rate" in errors[0]
    for name in os.listdir(tmp_path / "out"):
        if name.startswith("checkpoint-"):
            assert all(
                torch.isfinite(w).all() for w in load_file(tmp_path / "out" / name / "model.safetensors").values()
            )
