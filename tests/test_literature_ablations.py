"""The five ablations from the internal-feedback literature that are built in (docs/ablations.md): each against
values computed by hand, then a 2-step run of the script; the combinations that cannot run are refused in one
line before any model loads."""

import math

import pytest
import torch
from conftest import loss_terms, make_model, mixed_advantages
from test_intuitor import metrics, small_run
from test_runs import assert_one_error_line

import ablations as A
import intuitor as I
from intuitor_harness import tasks as T

EPS = 1e-4


def rollout(completion, **fields):
    return I.Rollout(prompt=[1], completion=completion, self_certainty=0.0, entropy=0.0, truncated=False, **fields)


# ----------------------------------------------------------------------------- Dr. GRPO
def test_loss_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # masked sum 6 over 3 tokens of 2 sequences; Dr. GRPO's constant: max_completion_length 4 x 2 sequences
    assert I.aggregate_loss(loss, mask, "token", 3, 2, 4).item() == pytest.approx(6 / 3)
    assert I.aggregate_loss(loss, mask, "grpo", 3, 2, 4).item() == pytest.approx((3 / 2 + 3 / 1) / 2)
    assert I.aggregate_loss(loss, mask, "dr_grpo", 3, 2, 4).item() == pytest.approx(6 / 8)
    assert {"token", "grpo", "dr_grpo"} <= set(I.LOSS_AGGREGATIONS) and I.TRL_LOSS_NAMES == {"dapo": "token"}


def test_dr_grpo_gradient_does_not_depend_on_the_other_completions_lengths():
    """Dr. GRPO's point: a token's weight is 1 / (max length x sequences), not 1 / (its own sequence's length)."""
    logp = torch.zeros(2, 4, requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    for lengths in ([1, 4], [3, 4]):
        mask = torch.tensor([[1] * n + [0] * (4 - n) for n in lengths])
        loss, _, _ = loss_terms(logp, logp.detach(), logp.detach(), adv, 0.0, 0.2, 0.2)
        logp.grad = None
        I.aggregate_loss(loss, mask, "dr_grpo", mask.sum(), 2, 4).backward()
        assert logp.grad[0, 0].item() == pytest.approx(-1 / 8)  # -A / (4 x 2), whatever the lengths


# ----------------------------------------------------------------------------- KL estimators
def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    r = math.log(0.25 / 0.5)  # log pi_ref / pi
    assert A.kl_k1(logp, ref).item() == pytest.approx(-r)
    assert A.kl_k2(logp, ref).item() == pytest.approx(r * r / 2)
    assert I.kl_k3(logp, ref).item() == pytest.approx(math.exp(r) - r - 1)
    assert {name: I.KL_ESTIMATORS[name] for name in ("k1", "k2", "k3")} == {"k1": A.kl_k1, "k2": A.kl_k2, "k3": I.kl_k3}


def test_only_k1_pushes_at_kl_zero():
    for name, pushes in (("k1", True), ("k2", False), ("k3", False)):
        logp = torch.tensor([-1.0, -2.0], requires_grad=True)
        _, kl, _ = loss_terms(logp[None], logp.detach()[None], logp.detach()[None], torch.zeros(1), 1.0, 0.2,
                                    0.2, kl_estimator=name)  # fmt: skip
        kl.sum().backward()
        assert kl.abs().max().item() == 0.0
        assert (logp.grad.abs().max().item() > 0) == pushes, name


# ----------------------------------------------------------------------------- token-level advantages
def test_token_group_advantages_by_hand():
    rewards = [torch.tensor([1.0, 2.0]), torch.tensor([3.0]), torch.tensor([5.0, 5.0]), torch.tensor([5.0])]
    a = A.token_group_advantages(rewards, 2)
    # group 1: tokens 1, 2, 3 -> mean 2, unbiased std 1; group 2: all equal -> exactly 0
    assert a[0].tolist() == pytest.approx([-1 / (1 + EPS), 0.0]) and a[1].tolist() == pytest.approx([1 / (1 + EPS)])
    assert a[2].tolist() == [0.0, 0.0] and a[3].tolist() == [0.0]
    none = A.token_group_advantages(rewards, 2, I.Args(scale_rewards="none"))
    assert none[0].tolist() == [-1.0, 0.0] and none[1].tolist() == [1.0]
    batch = A.token_group_advantages(rewards, 2, I.Args(scale_rewards="batch"))
    std = torch.tensor([1.0, 2, 3, 5, 5, 5], dtype=torch.float64).std().item()
    assert batch[1].item() == pytest.approx(1 / (std + EPS))


def test_sequence_and_token_rewards_mix_per_token():
    rewards = {
        "accuracy": torch.tensor([0.0, 1.0]),
        "token_self_certainty": [torch.tensor([1.0, 2.0]), torch.tensor([3.0])],
    }
    adv = mixed_advantages(rewards, {"accuracy": 1.0, "token_self_certainty": 0.5}, 2)
    seq = 0.5 / (0.5**0.5 + EPS)  # accuracy 0, 1: centred -0.5, 0.5; unbiased std sqrt(0.5)
    assert adv[0].tolist() == pytest.approx([-seq + 0.5 * -1 / (1 + EPS), -seq])
    assert adv[1].tolist() == pytest.approx([seq + 0.5 / (1 + EPS)])
    logged = I.per_sequence(rewards)["token_self_certainty"]
    assert logged.tolist() == pytest.approx([1.5, 3.0])


def test_token_advantages_equal_to_a_sequence_one_give_the_same_gradient(tokenizer):
    """(B, C) advantages that repeat each sequence's value reach the weights exactly as the (B,) ones do."""
    prompts = [tokenizer(t).input_ids for t in ("What is 2 + 3?", "x")]
    lm = make_model(tokenizer, seed=2, head_scale=3.0)
    torch.manual_seed(0)
    rollouts = I.sample(lm, prompts, 2, 10, 1.0, list(range(40, 60)), tokenizer.pad_token_id)
    assert len({len(r.completion) for r in rollouts}) > 1  # padding inside the batch
    grads = []
    for per_token in (False, True):
        for r, a in zip(rollouts, [0.7, -0.7, 1.0, -1.0]):
            r.advantage = torch.full((len(r.completion),), a) if per_token else a
        adv = I.batch_advantages(rollouts, "cpu")
        assert adv.shape == ((4, max(len(r.completion) for r in rollouts)) if per_token else (4,))
        lm.zero_grad()
        batch = I.collate(rollouts, tokenizer.pad_token_id, "cpu")
        logp = I.CompletionLogProbs(lm, 1.0, 8, 64)(*batch)["logp"]
        loss, _, _ = loss_terms(logp, logp.detach(), logp.detach(), adv, 0.0, 0.2, 0.2)
        I.aggregate_loss(loss, batch.completion_mask, "token", batch.completion_mask.sum(), 4).backward()
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


# ----------------------------------------------------------------------------- the rewards
def test_mean_logprob_and_answer_certainty_by_hand():
    a = rollout([5, 6, 7, 8], token_logp=torch.tensor([-1.0, -3.0, -2.0, -2.0]),
                token_certainty=torch.tensor([1.0, 2.0, 3.0, 4.0]), answer_tokens=(2, 4))  # fmt: skip
    b = rollout([5, 6], token_logp=torch.tensor([-0.5, -0.5]), token_certainty=torch.tensor([1.0, 4.0]))
    assert A.mean_logprob([a, b], 2, None) == pytest.approx([-2.0, -0.5])
    assert A.answer_self_certainty([a, b], 2, None) == pytest.approx(
        [3.5, 2.5]
    )  # b has no answer: the whole completion
    assert [t.tolist() for t in A.token_self_certainty([a, b], 2, None)] == [[1, 2, 3, 4], [1, 4]]
    rewards = I.compute_rewards([a, b], {"token_self_certainty": 1, "mean_logprob": 1}, 2, I.Args())
    assert isinstance(rewards["token_self_certainty"], list) and rewards["mean_logprob"].shape == (2,)


@pytest.mark.parametrize("answer_format,text,answer", [
    ("boxed", "We add: 3 + 4 = 7, so \\boxed{7}. Done", "7"),
    ("number", "Tom has 12 apples and gets 30 more: 42 apples", "42"),
])  # fmt: skip
def test_answer_token_span_covers_the_answer(tokenizer, answer_format, text, answer):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    start, end = T.answer_token_span(tokenizer, ids, answer_format)
    inside = tokenizer.decode(ids[start:end])
    assert answer in inside and len(inside.strip()) <= len(answer) + 3  # the answer and at most a brace or space
    assert T.answer_token_span(tokenizer, tokenizer("no answer here").input_ids, "boxed") is None


# ----------------------------------------------------------------------------- through the script
ABLATIONS = {
    "dr_grpo": ["--scale_rewards", "none", "--loss_type", "dr_grpo"],
    "token_self_certainty": ["--reward", "token_self_certainty"],
    "mean_logprob": ["--reward", "mean_logprob"],
    "k1": ["--kl_estimator", "k1"],
    "k2": ["--kl_estimator", "k2"],
    "answer_self_certainty": ["--reward", "answer_self_certainty"],
    "gspo": ["--importance_sampling_level", "sequence"],
    "all_together": ["--reward", "token_self_certainty=1,answer_self_certainty=0.5,mean_logprob=0.5",
                     "--scale_rewards", "none", "--loss_type", "dr_grpo", "--kl_estimator", "k2"],
}  # fmt: skip


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_two_step_run(tiny_dir, tmp_path, name):
    small_run(tiny_dir, tmp_path, "--max_steps", "2", "--save_steps", "0", "--beta", "0.05", *ABLATIONS[name])
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/kl"]) for r in records)
    if name == "k1":  # k1 can be negative; k2 and k3 cannot
        return
    assert all(r["train/kl"] >= 0 for r in records)


@pytest.mark.parametrize("flags,needle", [
    (["--reward", "token_self_certainty", "--reward_mixing", "official"], "--reward_mixing official mixes"),
    (["--reward", "answer_self_certainty", "--certainty_model", "reference"], "--certainty_model reference replaces"),
    (["--loss_type", "bnpo"], "--loss_type: unknown name 'bnpo'; choose from"),
    (["--kl_estimator", "k4"], "--kl_estimator: unknown name 'k4'; choose from"),
])  # fmt: skip
def test_what_cannot_run_is_refused_in_one_line(tiny_dir, tmp_path, flags, needle):
    p = small_run(tiny_dir, tmp_path / "run", *flags, check=False)
    assert_one_error_line(p, needle)
    assert not (tmp_path / "run").exists()  # before the run directory, so before any model


def test_the_recipes_on_the_ablation_page_work(tokenizer, monkeypatch):
    """Every python block of docs/ablations.md, run against a fresh copy of intuitor.py: each registers a flag
    value that then computes on real rollouts."""
    import importlib.util
    import os
    import re
    import sys

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("intuitor_fork", os.path.join(ROOT, "intuitor.py"))
    fork = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "intuitor_fork", fork)  # dataclasses look their module up there
    spec.loader.exec_module(fork)
    page = open(os.path.join(ROOT, "docs", "ablations.md"), encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) == 5
    for block in blocks:
        exec(block, vars(fork))
    lm = make_model(tokenizer, seed=2, head_scale=3.0)
    rollouts = fork.sample(lm, [tokenizer("What is 2 + 3?").input_ids] * 2, 3, 6, 1.0, [], tokenizer.pad_token_id)
    for r, answer in zip(rollouts, ["5", "5", "4", "5", "4", "3"]):
        r.answer = answer
    args = fork.Args()
    args.vote_share_threshold = 0.6  # the flag the page declares in Args
    rewards = fork.compute_rewards(rollouts, {"confident_vote": 1, "neg_token_entropy": 1}, 3, args)
    assert rewards["confident_vote"].tolist() == [1, 1, 0, 0, 0, 0]  # 2/3 >= 0.6 in group 1, 1/3 in group 2
    assert [len(v) for v in rewards["neg_token_entropy"]] == [6] * 6
    assert fork.REWARDS["neg_token_entropy"].advantages is not None  # token-level: its own advantage rule
    logp, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -30.0, 97.0]])
    kl = fork.KL_ESTIMATORS["k3_clamped"](logp, ref)
    assert kl[0, 1].item() == pytest.approx(math.exp(-10) + 10 - 1) and kl[0, 2].item() == pytest.approx(
        math.exp(10) - 10 - 1, rel=1e-6
    )  # a log-ratio of +100 held at +10: finite
    loss, mask = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[1, 1], [1, 0]])
    assert fork.aggregate_loss(loss, mask, "sequence_sum", 3, 2).item() == pytest.approx(3.0)
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.2], [-0.5, -0.5]])
    ratio, low, high = fork.IMPORTANCE_RATIOS["sequence_token"](logp, old, torch.ones(2, 2), args)
    assert ratio[0].tolist() == pytest.approx([math.exp(0.15)] * 2) and (low, high) == (3e-4, 4e-4)
    assert "sequence_sum" not in I.LOSS_AGGREGATIONS  # the fork's registries, not the project's


# ----------------------------------------------------------------------------- GSPO, hooks, help
def test_gspo_equals_grpo_with_one_iteration(tokenizer):
    """With num_iterations 1 (pi_old = pi), the sequence ratio is 1 and its gradient the mean of the tokens'
    log-prob gradients: the update is GRPO's, token for token, under both aggregations."""
    lm = make_model(tokenizer, seed=2, head_scale=3.0)
    torch.manual_seed(0)
    prompts = [tokenizer(t).input_ids for t in ("What is 2 + 3?", "x")]
    rollouts = I.sample(lm, prompts, 2, 10, 1.0, list(range(40, 60)), tokenizer.pad_token_id)
    assert len({len(r.completion) for r in rollouts}) > 1  # sequences of different lengths
    batch = I.collate(rollouts, tokenizer.pad_token_id, "cpu")
    adv = torch.tensor([0.7, -0.7, 1.0, -1.0])
    for loss_type in ("token", "grpo"):
        grads = {}
        for level in ("token", "sequence"):
            lm.zero_grad()
            logp = I.CompletionLogProbs(lm, 1.0, 8, 64)(*batch)["logp"]
            mask = batch.completion_mask
            ratio, low, high = I.IMPORTANCE_RATIOS[level](logp, logp.detach(), mask, I.Args())
            assert torch.allclose(ratio, torch.ones_like(ratio))
            loss, _ = I.per_token_loss(ratio, adv, torch.zeros_like(logp), 0.0, low, high)
            I.aggregate_loss(loss, mask, loss_type, mask.sum(), 4).backward()
            grads[level] = torch.cat([p.grad.flatten() for p in lm.parameters() if p.grad is not None])
        if loss_type == "token":  # GSPO's ratio spreads a sequence's push over its tokens as the token loss does
            torch.testing.assert_close(grads["sequence"], grads["token"], rtol=1e-5, atol=1e-7)
        assert grads["sequence"].abs().max() > 0


def test_gspo_sequence_ratio_by_hand():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    old = torch.tensor([[-1.2, -2.4, 9.0], [-0.4, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    args = I.Args(sequence_epsilon=0.01, sequence_epsilon_high=0.02)
    ratio, low, high = I.IMPORTANCE_RATIOS["sequence"](logp, old, mask, args)
    assert ratio.shape == (2, 1) and (low, high) == (0.01, 0.02)
    assert ratio[:, 0].tolist() == pytest.approx([math.exp((0.2 + 0.4) / 2), math.exp(-0.1)])  # padding ignored


def test_gspo_runs_through_the_script(tiny_dir, tmp_path):
    small_run(tiny_dir, tmp_path, "--max_steps", "2", "--save_steps", "0", "--importance_sampling_level",
              "sequence", "--num_iterations", "2")  # fmt: skip
    assert all(math.isfinite(r["train/loss"]) for r in metrics(tmp_path))


def test_help_lists_each_registry_from_the_registry():
    """--help reads the names off the registries at parse time: an entry a fork adds is listed."""
    I.KL_ESTIMATORS["k9_fork"] = I.kl_k3
    try:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            I.parse_args(["--help"])
    finally:
        del I.KL_ESTIMATORS["k9_fork"]
    text = " ".join(out.getvalue().split())
    for flag, registry in I.flag_registries().items():
        assert f"--{flag}" in text and all(name in text for name in registry), flag
    assert "k9_fork" in text and "variations from the literature" in text
    assert "--final-checkpoint" not in text and "the same as --final_checkpoint false" in text


def test_refusals_come_from_the_entries_properties(tiny_dir, tmp_path, monkeypatch):
    """A reward that reads the policy's certainty is refused with --certainty_model reference by its property."""
    monkeypatch.setitem(I.REWARDS, "fork_sc", I.Reward(I.online_self_certainty, reads_policy_certainty=True))
    args = I.Args(reward="fork_sc", certainty_model="reference")
    with pytest.raises(SystemExit):
        I.check_names(args, I.parse_reward(args.reward))


def test_a_reward_named_twice_is_refused(tiny_dir, tmp_path):
    p = small_run(tiny_dir, tmp_path / "run", "--reward", "self_certainty=1,self_certainty=-1", check=False)
    assert_one_error_line(p, "--reward: self_certainty is named twice")
    assert not (tmp_path / "run").exists()


def test_number_answer_span_leaves_a_trailing_comma_out(tokenizer):
    assert T.answer_span("the total is 42, done", "number") == (13, 15)
    assert T.extract_answer("the total is 42, done", "number") == "42"
    assert T.extract_answer("it costs 1,234.5 dollars", "number") == "1234.5"
    ids = tokenizer("the total is 42, done", add_special_tokens=False).input_ids
    start, end = T.answer_token_span(tokenizer, ids, "number")
    assert "," not in tokenizer.decode(ids[start:end]) and "42" in tokenizer.decode(ids[start:end])
