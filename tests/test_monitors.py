"""Seeing reward hacking coming: per-step monitors against hand-computed values, the alarm on synthetic metric
streams both ways, the sampling knobs against a naive reference, truncation masking, trackers read back."""

import glob
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_model
from test_intuitor import metrics, small_run

import intuitor as I
from intuitor_harness import watch


# ---------------------------------------------------------------- sampling knobs
def naive_filter(logits, temperature, top_k, top_p):
    """Per row: keep the top_k most likely tokens, then the smallest prefix (by probability) reaching top_p."""
    z = logits.double() / temperature
    keep = torch.zeros_like(z, dtype=torch.bool)
    for i, row in enumerate(z):
        order = row.argsort(descending=True).tolist()[: top_k or len(row)]
        p = torch.softmax(row[order], 0)
        total = 0.0
        for j, token in enumerate(order):
            keep[i, token] = True
            total += p[j].item()
            if total >= top_p:
                break
    return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (10, 0.5), (1, 1.0)])
def test_sampling_logits_match_naive_filter(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    z = I.sampling_logits(logits, 0.8, top_k, top_p)
    assert torch.equal(torch.isfinite(z), naive_filter(logits, 0.8, top_k, top_p))
    torch.testing.assert_close(z[torch.isfinite(z)], (logits / 0.8)[torch.isfinite(z)])


def test_top_k_one_samples_the_greedy_completion_and_self_certainty_is_read_raw(tokenizer):
    lm = make_model(tokenizer, seed=4, head_scale=4.0)
    prompts = [tokenizer("What is 2 + 3?").input_ids, tokenizer("y").input_ids]
    greedy = I.sample(lm, prompts, 2, 10, 0.0, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    top1 = I.sample(lm, prompts, 2, 10, 1.3, [tokenizer.eos_token_id], tokenizer.pad_token_id, top_k=1)
    assert [r.completion for r in top1] == [r.completion for r in greedy]
    assert [r.self_certainty for r in top1] == pytest.approx([r.self_certainty for r in greedy], abs=1e-5)


# ---------------------------------------------------------------- monitors
def test_repeated_ngram_fraction():
    assert watch.repeated_ngram_frac([1, 2, 3, 4, 5, 6]) == 0
    assert watch.repeated_ngram_frac([7] * 10) == pytest.approx(1 - 1 / 7)  # 7 four-grams, one distinct
    assert watch.repeated_ngram_frac([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 - 4 / 5)
    assert watch.repeated_ngram_frac([1, 2]) == 0


def test_step_monitors_by_hand():
    def rollout(sc, ok, tokens):
        return I.Rollout([1], tokens, self_certainty=sc, entropy=2.0, truncated=False, correct=ok)

    # group 1: the most certain is right; group 2: the most certain is wrong; group 3: all rewards equal
    rollouts = [rollout(3.0, True, [1, 2]), rollout(1.0, False, [1, 2]),
                rollout(0.5, True, [1, 2]), rollout(2.0, False, [1, 2]),
                rollout(1.5, False, [5] * 6), rollout(1.5, False, [5] * 6)]  # fmt: skip
    rewards = {"self_certainty": torch.tensor([3.0, 1.0, 0.5, 2.0, 1.5, 1.5])}
    update = dict(loss=0.0, kl=0.0, clip_frac=0.0, grad_norm=1.0, skipped_updates=0)
    timings = {"sample_s": 1.0, "reward_s": 0.0, "update_s": 1.0}
    record = watch.step_metrics(1, rollouts, rewards, update, 1e-3, True, timings, num_generations=2)
    assert record["monitor/most_certain_accuracy"] == pytest.approx(1 / 3)  # right, wrong, wrong
    assert record["monitor/equal_reward_groups"] == pytest.approx(1 / 3)
    # correct SC {3.0, 0.5} vs wrong {1.0, 2.0, 1.5, 1.5}: pairs won 4 of 8 -> AUROC 0.5
    assert record["monitor/certainty_auroc"] == pytest.approx(0.5)
    assert record["monitor/repeated_4gram_frac"] == pytest.approx(2 * (1 - 1 / 3) / 6)
    assert record["monitor/entropy"] == 2.0


def stream(steps, length, accuracy, reward, entropy, repetition=lambda s: 0.05):
    records = []
    for s in range(1, steps + 1):
        r = {"step": s, "train/completion_length": length(s), "train/reward/self_certainty": reward(s),
             "monitor/entropy": entropy(s), "monitor/repeated_4gram_frac": repetition(s)}  # fmt: skip
        if accuracy is not None:
            r["train/accuracy"] = accuracy(s)
        records.append(r)
    return records


def alarms(records):
    alarm = watch.HackingAlarm(window=5)
    fired = []
    for r in records:
        r["monitor/alarm"], message = alarm.check(r)
        if message:
            fired.append((r["step"], message))
    return fired, records


def test_alarm_fires_on_the_hacking_signature():
    # Fig. 7: from step 12 the policy appends solved problems; length doubles, accuracy falls, reward rises
    hacked = stream(25, length=lambda s: 60 if s < 12 else 130, accuracy=lambda s: 0.5 if s < 12 else 0.2,
                    reward=lambda s: 10 + 0.1 * s, entropy=lambda s: 1.5)  # fmt: skip
    fired, records = alarms(hacked)
    assert fired and 12 <= fired[0][0] <= 17 and "completion length jumped" in fired[0][1]
    assert "accuracy fell" in fired[0][1] and records[fired[0][0] - 1]["monitor/alarm"] == 1
    # without gold answers: length and repetition jump while the reward rises
    blind = stream(25, length=lambda s: 60 if s < 12 else 130, accuracy=None, reward=lambda s: 10 + 0.1 * s,
                   entropy=lambda s: 1.5, repetition=lambda s: 0.05 if s < 12 else 0.5)  # fmt: skip
    assert alarms(blind)[0] and "repetition jumped" in alarms(blind)[0][0][1]


def test_alarm_fires_on_entropy_collapse():
    collapsed = stream(20, length=lambda s: 60, accuracy=lambda s: 0.5, reward=lambda s: 10 + 0.1 * s,
                       entropy=lambda s: 2.0 if s < 8 else 0.2)  # fmt: skip
    fired, records = alarms(collapsed)
    assert fired and "entropy collapsed" in fired[0][1]
    assert len(fired) == 1 and sum(r["monitor/alarm"] for r in records) > 5  # announced once, flagged throughout


def test_alarm_is_silent_on_a_healthy_run():
    healthy = stream(40, length=lambda s: 60 + 5 * math.sin(s), accuracy=lambda s: 0.3 + 0.01 * s,
                     reward=lambda s: 10 + 0.1 * s, entropy=lambda s: 2.0 - 0.01 * s)  # fmt: skip
    fired, records = alarms(healthy)
    assert fired == [] and all(r["monitor/alarm"] == 0 for r in records)
    # longer answers that are also more often right: learning, not hacking
    longer = stream(25, length=lambda s: 60 if s < 12 else 130, accuracy=lambda s: 0.3 if s < 12 else 0.6,
                    reward=lambda s: 10 + 0.1 * s, entropy=lambda s: 1.5)  # fmt: skip
    assert alarms(longer)[0] == []


def test_training_logs_monitors(tiny_dir, tmp_path):
    small_run(tiny_dir, tmp_path, "--max_steps", "2", "--save_steps", "0", "--top_k", "50", "--top_p", "0.9")
    for record in metrics(tmp_path):
        for key in ("monitor/entropy", "monitor/repeated_4gram_frac", "monitor/equal_reward_groups",
                    "monitor/most_certain_accuracy", "monitor/alarm"):  # fmt: skip
            assert math.isfinite(record[key]), key


# ---------------------------------------------------------------- truncated completions out of the loss
def test_masked_truncated_completions_take_no_part_in_the_loss(tokenizer):
    def update(mask, truncate):
        lm = make_model(tokenizer, seed=6, head_scale=4.0)
        torch.manual_seed(7)
        prompts = [tokenizer(t).input_ids for t in ("What is 2 + 3?", "Let x = 4.")]
        rollouts = I.sample(lm, prompts, 2, 8, 1.0, [tokenizer.eos_token_id], tokenizer.pad_token_id)
        for k, r in enumerate(rollouts):
            r.advantage, r.truncated = (1.0 if k % 2 else -1.0), truncate(k)
        before = [p.detach().clone() for p in lm.parameters()]
        opt = torch.optim.SGD(lm.parameters(), lr=1.0)
        config = I.Args(
            beta=0.0,
            micro_batch_size=2,
            max_grad_norm=1e9,
            mask_truncated_completions=mask,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        I.optimize(I.CompletionLogProbs(lm, 1.0, 8, 64), None, opt, sched, rollouts, tokenizer.pad_token_id, config)
        return [p.detach() - b for p, b in zip(lm.parameters(), before)]

    masked_all = update(True, lambda k: True)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in masked_all)  # nothing left to learn from
    unmasked, masked_none = update(False, lambda k: True), update(True, lambda k: False)
    for a, b in zip(unmasked, masked_none):  # no truncated completion: the flag changes nothing
        torch.testing.assert_close(a, b)
    assert any(d.abs().max() > 0 for d in unmasked)


# ---------------------------------------------------------------- trackers and plots
def test_report_to_tensorboard_is_read_back(tiny_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    small_run(tiny_dir, tmp_path, "--max_steps", "2", "--save_steps", "0", "--report_to", "tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard" / tmp_path.name))  # the run name: output_dir's folder
    events.Reload()
    logged = [e.value for e in events.Scalars("train/self_certainty")]
    assert logged == pytest.approx([r["train/self_certainty"] for r in metrics(tmp_path)], rel=1e-6)


def test_report_to_wandb_offline(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    small_run(tiny_dir, tmp_path, "--max_steps", "2", "--save_steps", "0", "--report_to", "wandb")
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))


def test_plot_several_runs_and_never_a_tracked_file(tmp_path):
    for name, slope in (("a", 0.1), ("b", -0.1)):
        os.makedirs(tmp_path / name)
        lines = [f'{{"step": {s}, "train/self_certainty": {slope * s}, "train/completion_length": {10 + s}}}'
                 for s in range(1, 5)]  # fmt: skip
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    plot = [sys.executable, os.path.join(ROOT, "intuitor.py"), "plot"]
    runs = [str(tmp_path / "a" / "metrics.jsonl"), str(tmp_path / "b" / "metrics.jsonl")]
    p = subprocess.run([*plot, *runs, str(tmp_path / "both.png")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tracked = os.path.join(ROOT, "docs", "smollm2_intuitor_curves.png")
    before = open(tracked, "rb").read()
    p = subprocess.run([*plot, runs[0], tracked], capture_output=True, text=True)
    assert p.returncode != 0 and "--force" in p.stderr and open(tracked, "rb").read() == before
    assert subprocess.run([*plot, "--help"], capture_output=True, text=True).returncode == 0
