"""What a TRL user and a packager expect: TRL's flag names where the meaning is the same, advantages scaled by
the group, the step or not at all, resuming from a named checkpoint, a real package."""

import os
import shutil
import sys

import pytest
import torch
from conftest import ROOT
from test_intuitor import metrics, small_run
from test_runs import assert_one_error_line

import intuitor as I
from intuitor_harness import tasks


def scaled(rewards, num_generations, scale):  # --scale_rewards SCALE's advantages
    return I.ADVANTAGES[scale](rewards, num_generations, None)


def test_scale_rewards_group_batch_none_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 10.0])
    # group: group 1 std 1 -> (-1, 0, 1) / 1.0001; group 2 (4, 4, 10): mean 6, std sqrt(12) = 3.4641
    group = scaled(r, 3, "group")
    assert group.tolist() == pytest.approx([-1 / 1.0001, 0, 1 / 1.0001, -2 / 3.4642, -2 / 3.4642, 4 / 3.4642], abs=1e-4)
    # batch: one std over all six rewards: mean 4, squares 1+4+9+16+16+100 = 146 -> var (146 - 96) / 5 = 10
    batch = scaled(r, 3, "batch")
    s = 10**0.5 + 1e-4
    assert batch.tolist() == pytest.approx([-1 / s, 0, 1 / s, -2 / s, -2 / s, 4 / s], abs=1e-5)
    # none (Dr. GRPO): centred only
    assert scaled(r, 3, "none").tolist() == pytest.approx([-1, 0, 1, -2, -2, 4])
    equal = torch.tensor([5.0, 5.0, 5.0])
    assert all(scaled(equal, 3, s).tolist() == [0, 0, 0] for s in ("group", "batch", "none"))


@pytest.mark.parametrize("scale", ["batch", "none"])
def test_scale_rewards_runs_through_the_script(tiny_dir, tmp_path, scale):
    small_run(tiny_dir, tmp_path, "--max_steps", "1", "--scale_rewards", scale)
    assert metrics(tmp_path)[0]["step"] == 1


def test_trl_loss_names(tiny_dir, tmp_path):
    small_run(tiny_dir, tmp_path / "dapo", "--max_steps", "1", "--loss_type", "dapo")
    state = torch.load(tmp_path / "dapo" / "checkpoint-1" / "trainer_state.pt", weights_only=False)
    assert state["args"]["loss_type"] == "token"  # TRL's dapo is this project's token
    for flag, unknown in (("--loss_type", "bnpo"), ("--kl_estimator", "k4")):  # refused before anything loads
        p = small_run(tiny_dir, tmp_path / unknown, flag, unknown, check=False)
        assert_one_error_line(p, f"{flag}: unknown name '{unknown}'; choose from")
        assert not (tmp_path / unknown).exists()


def test_num_train_epochs_and_run_name(tiny_dir, tmp_path):
    pytest.importorskip("tensorboard")
    p = small_run(tiny_dir, tmp_path, "--prompts_per_step", "8", "--num_train_epochs", "2", "--max_completion_length",
                  "4", "--save_steps", "0", "--report_to", "tensorboard", "--run_name", "trial-7")  # fmt: skip
    assert "6 steps" in p.stdout + p.stderr  # 24 prompts / 8 = 3 steps an epoch, two epochs
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert os.listdir(tmp_path / "tensorboard") == ["trial-7"]


def test_dataset_config_reaches_the_hub_loader(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or [{"question": "q"}])
    monkeypatch.setattr(tasks, "check_hub", lambda inputs: None)  # as if the dataset were in the local cache
    tasks.load_rows("openai/gsm8k", "test", config="main")
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"})]


def test_resume_from_a_named_checkpoint_equals_the_uninterrupted_run(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    flags = ("--max_steps", "3", "--save_steps", "1", "--save_total_limit", "0", "--learning_rate", "1e-3")
    small_run(tiny_dir, a, *flags)
    shutil.copytree(a, b)
    small_run(tiny_dir, b, *flags, "--resume_from_checkpoint", str(b / "checkpoint-1"))
    assert [r["step"] for r in metrics(b)] == [1, 2, 3]
    wa, wb = load_file(a / "checkpoint-3" / "model.safetensors"), load_file(b / "checkpoint-3" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    p = small_run(tiny_dir, b, *flags, "--resume_from_checkpoint", str(tmp_path), check=False)
    assert_one_error_line(p, "pass a checkpoint-N folder")


def test_pyproject_is_a_real_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    assert project["project"]["name"] == "intuitor-minimal"
    assert project["tool"]["setuptools"] == {
        "py-modules": ["intuitor", "ablations"],
        "packages": ["intuitor_harness"],
    }  # no `data`
    deps = project["project"]["dependencies"]
    assert all("<" in d and ">=" in d for d in deps), deps  # bounded both ways
    runtime = [line.split("#")[0].strip() for line in open(os.path.join(ROOT, "requirements.txt"))]
    runtime = [line for line in runtime if line]
    assert set(deps) <= set(runtime) and not any(x in " ".join(runtime) for x in ("pytest", "ruff"))
    assert {"gguf", "plot", "trackers", "dev"} <= project["project"]["optional-dependencies"].keys()
    assert sys.version_info >= (3, 10)
