"""The paper's comparisons one flag away: GRPO (accuracy), GRPO-PV (plurality), neg_entropy, reward mixing,
offline self-certainty (scored by the frozen reference model)."""

import json
import math

import pytest
import torch
from conftest import make_model, mixed_advantages
from test_intuitor import metrics, naive_entropy, naive_self_certainty, run, small_run

import intuitor as I
from intuitor_harness import tasks as T


def test_plurality_votes():
    assert T.plurality_votes(["3", "3", "5", None]) == [1, 1, 0, 0]
    assert T.plurality_votes(["5", "3", "3", "5"]) == [1, 0, 0, 1]  # tie: the answer seen first
    assert T.plurality_votes(["0.5", "\\frac{1}{2}", "2"]) == [1, 1, 0]  # equivalent answers vote together
    assert T.plurality_votes([None, None]) == [0, 0]  # no answer scores 0


def test_compute_rewards():
    def rollout(**fields):
        return I.Rollout(prompt=[1], completion=[2], truncated=False, **fields)

    rollouts = [
        rollout(self_certainty=0.5, self_certainty_ref=0.7, entropy=2.0, correct=True, answer="4"),
        rollout(self_certainty=0.9, self_certainty_ref=0.1, entropy=1.0, correct=False, answer="5"),
        rollout(self_certainty=0.2, self_certainty_ref=0.3, entropy=3.0, correct=True, answer="4"),
    ]
    names = {"self_certainty": 1, "accuracy": 1, "plurality": 1, "neg_entropy": 1}
    r = {k: v.tolist() for k, v in I.compute_rewards(rollouts, names, 3, I.Args()).items()}
    assert r == {
        "self_certainty": pytest.approx([0.5, 0.9, 0.2]),
        "accuracy": [1.0, 0.0, 1.0],
        "plurality": [1.0, 0.0, 1.0],
        "neg_entropy": [-2.0, -1.0, -3.0],
    }
    reference = I.Args(certainty_model="reference")
    offline = I.compute_rewards(rollouts, {"self_certainty": 1}, 3, reference)["self_certainty"]
    assert offline.tolist() == pytest.approx([0.7, 0.1, 0.3])


def test_mixing_matches_hand_computation():
    # group 1: SC 1, 2, 3 -> mean 2, std 1 -> (-1, 0, 1) / 1.0001
    #          acc 1, 0, 0 -> mean 1/3, std sqrt(1/3) = .57735 -> (.66667, -.33333, -.33333) / .57745
    # advantage = SC part + 0.5 * acc part; group 2 is all-equal in both: zero
    rewards = {
        "self_certainty": torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0]),
        "accuracy": torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]),
    }
    adv = mixed_advantages(rewards, {"self_certainty": 1.0, "accuracy": 0.5}, 3)
    expected = [-1 / 1.0001 + 0.5 * 1.154501, 0.5 * -0.577250, 1 / 1.0001 + 0.5 * -0.577250, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)
    only_logged = mixed_advantages(rewards, {"self_certainty": 1.0, "accuracy": 0.0}, 3)
    assert torch.allclose(only_logged, I.group_advantages(rewards["self_certainty"], 3))


def test_official_mixing_matches_hand_computation():
    """The official trainer: the weighted sum of the non-SC rewards is normalised once; SC, normalised alone, is
    added at its weight. One non-SC reward's weight then cancels: 0.5 * acc normalises like acc (up to eps)."""
    rewards = {
        "self_certainty": torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0]),
        "accuracy": torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]),
        "plurality": torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0]),
    }
    # 0.5 * acc = .5, 0, 0 -> mean 1/6, std .288675 -> (1/3, -1/6, -1/6) / .288775 = (1.154301, -.577150, -.577150)
    adv = mixed_advantages(rewards, {"self_certainty": 1.0, "accuracy": 0.5}, 3, mixing="official")
    expected = [-1 / 1.0001 + 1.154301, -0.577150, 1 / 1.0001 - 0.577150, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)
    # acc + plurality = 1, 1, 1 in group 1: the sum carries no signal, so only SC moves it; group 2: 2, 1, 1
    # -> mean 4/3, std .57735 -> (2/3, -1/3, -1/3) / .57745 (SC is all-equal there)
    adv = mixed_advantages(rewards, {"self_certainty": 1.0, "accuracy": 1.0, "plurality": 1.0}, 3, "official")
    expected = [-1 / 1.0001, 0, 1 / 1.0001, 1.154501, -0.577250, -0.577250]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)
    separate = mixed_advantages(rewards, {"self_certainty": 1.0, "accuracy": 0.5}, 3)
    assert separate[1].item() == pytest.approx(0.5 * -0.577250, abs=1e-5)  # the default rule keeps the weight


def test_offline_self_certainty_and_entropy_match_full_forward(tokenizer):
    policy, reference = make_model(tokenizer, seed=3, head_scale=4.0), make_model(tokenizer, seed=9, head_scale=6.0)
    prompts = [tokenizer(t).input_ids for t in ("What is 2 + 3?", "Let x = 4. Then x^2 is")]
    torch.manual_seed(1)
    rollouts = I.sample(policy, prompts, 2, 10, 1.0, list(range(40, 60)), tokenizer.pad_token_id)
    I.reference_certainty(I.CompletionLogProbs(reference, 1.0, 3, 50), rollouts, 3, tokenizer.pad_token_id)
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt + r.completion])
            sl = slice(len(r.prompt) - 1, -1)
            ref_logits, pol_logits = (
                reference(input_ids=ids).logits[0, sl].double(),
                policy(input_ids=ids).logits[0, sl].double(),
            )
            assert r.self_certainty_ref == pytest.approx(naive_self_certainty(ref_logits).mean().item(), abs=1e-4)
            assert r.entropy == pytest.approx(naive_entropy(pol_logits).mean().item(), abs=1e-4)
            assert r.self_certainty_ref != pytest.approx(r.self_certainty, abs=1e-3)  # a different model


@pytest.mark.parametrize(
    "reward,extra",
    [
        ("accuracy", []),
        ("plurality", []),
        ("neg_entropy", []),
        ("self_certainty=1,accuracy=0.5", []),
        ("self_certainty", ["--certainty_model", "reference", "--beta", "0"]),
    ],
)
def test_each_reward_runs_through_the_script(tiny_dir, tmp_path, reward, extra):
    small_run(tiny_dir, tmp_path, "--max_steps", "2", "--save_steps", "0", "--reward", reward, *extra)
    recs = metrics(tmp_path)
    names = [part.split("=")[0] for part in reward.split(",")]
    for rec in recs:
        assert all(math.isfinite(rec[f"train/reward/{n}"]) for n in names)
        assert 0 <= rec["train/accuracy"] <= 1  # the fixture has gold answers: always monitored
    if "--certainty_model" in extra:  # at step 1 the frozen copy is the policy: offline SC = online SC
        assert recs[0]["train/reward/self_certainty"] == pytest.approx(recs[0]["train/self_certainty"], abs=1e-4)


def test_accuracy_reward_without_gold_answers_fails_clearly(tiny_dir, tmp_path):
    data = tmp_path / "no_gold.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} + 1?"}) + "\n" for i in range(4)))
    p = run(
        "--model",
        tiny_dir,
        "--dataset",
        str(data),
        "--prompts_per_step",
        "2",
        "--num_generations",
        "2",
        "--reward",
        "accuracy",
        "--output_dir",
        str(tmp_path / "out"),
        check=False,
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr and "--answer_column" in p.stderr
    assert not (tmp_path / "out").exists()
