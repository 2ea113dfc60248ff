"""Each equation against a plain float64 reference, alignment under left padding, and the script end to end."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DATA, ROOT, loss_terms, make_model, mixed_advantages

import intuitor as I


# ---------------------------------------------------------------- naive references (float64, full vocabulary)
def naive_self_certainty(logits):
    z = logits.double()
    V = z.shape[-1]
    return torch.log(torch.exp(z).sum(-1)) - z.sum(-1) / V - math.log(V)


def naive_entropy(logits):
    p = torch.softmax(logits.double(), -1)
    return -(p * torch.log(p)).sum(-1)


def naive_logp(hidden, weight, targets, temperature):
    logits = hidden.double() @ weight.double().T / temperature
    return torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)


# ---------------------------------------------------------------- self-certainty
def test_self_certainty_matches_naive_and_is_nonnegative():
    torch.manual_seed(0)
    for scale in (0.1, 1.0, 30.0):
        logits = torch.randn(5, 7, 301) * scale
        sc = I.self_certainty(logits)
        assert sc.shape == (5, 7)
        torch.testing.assert_close(sc.double(), naive_self_certainty(logits), rtol=1e-5, atol=1e-5)
        assert (sc >= -1e-6).all()
    assert I.self_certainty(torch.full((3, 301), 4.2)).abs().max() < 1e-5  # uniform -> 0


@pytest.mark.parametrize("chunk,vocab_chunk", [(1, 7), (5, 64), (64, 299), (1000, 512)])
def test_streamed_stats_match_naive(chunk, vocab_chunk):
    torch.manual_seed(1)
    N, H, V = 37, 16, 300  # V not a multiple of any vocab chunk
    h, w = torch.randn(N, H), torch.randn(V, H) * 2
    targets = torch.randint(0, V, (N,))
    targets[:2] = torch.tensor([0, V - 1])  # the first and last vocabulary slices
    st = I.streamed_token_stats(h, w, targets, temperature=0.7, chunk_size=chunk, vocab_chunk=vocab_chunk)
    logits = h.double() @ w.double().T
    torch.testing.assert_close(st["self_certainty"].double(), naive_self_certainty(logits), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st["entropy"].double(), naive_entropy(logits), rtol=1e-4, atol=5e-5)  # fp32 cancellation
    torch.testing.assert_close(st["logp"].double(), naive_logp(h, w, targets, 0.7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk,vocab_chunk", [(4, 33), (100, 1024)])
def test_streamed_logprobs_gradient_matches_log_softmax(chunk, vocab_chunk):
    torch.manual_seed(2)
    N, H, V = 29, 12, 300
    h, w = torch.randn(N, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    upstream = torch.randn(N)
    logp = I.StreamedLogProbs.apply(h, w, targets, 0.9, chunk, vocab_chunk)
    (logp * upstream).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = naive_logp(h64, w64, targets, 0.9)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(logp.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_streamed_weight_gradient_accumulates_in_place_with_tied_embeddings():
    """Two micro-batches through a weight tied to the input embedding: the streamed backward adds its tiles
    straight into the parameter's .grad, the embedding's gradient joins through autograd, and the sum matches
    float64 autograd. Untied, autograd only ever sees a stride-0 zero: no second full-size gradient."""
    torch.manual_seed(3)
    V, H = 97, 8
    w = torch.randn(V, H, requires_grad=True)
    mix = torch.randn(H, H)
    batches = [(torch.randint(0, V, (n,)), torch.randint(0, V, (n,)), torch.randn(n)) for n in (13, 21)]

    def loss(weight, inputs, targets, upstream, streamed):
        h = torch.tanh(torch.nn.functional.embedding(inputs, weight) @ mix.to(weight.dtype))  # tied: W in, W out
        logp = (
            I.StreamedLogProbs.apply(h, weight, targets, 0.8, 5, 16)
            if streamed
            else naive_logp(h, weight, targets, 0.8)
        )
        return (logp * upstream.to(weight.dtype)).sum()

    for batch in batches:
        loss(w, *batch, streamed=True).backward()
    w64 = w.detach().double().requires_grad_()
    for batch in batches:
        loss(w64, *batch, streamed=False).backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)

    head = torch.randn(V, H, requires_grad=True)
    incoming = []
    head.register_hook(lambda grad: incoming.append(grad.stride()))
    for _, targets, upstream in batches:
        (I.StreamedLogProbs.apply(torch.randn(len(targets), H), head, targets, 0.8, 5, 16) * upstream).sum().backward()
    assert incoming == [(0, 0), (0, 0)] and head.grad.abs().sum() > 0


def test_tied_head_model_gradients_through_the_streamed_head_match_full_logits(tokenizer):
    """A whole tied model (lm_head = input embedding): every parameter's gradient through CompletionLogProbs equals
    autograd through full logits, over two micro-batches accumulated in one .grad."""
    import copy

    lm = make_model(tokenizer, seed=5, head_scale=2.0, tie_word_embeddings=True)
    assert lm.lm_head.weight is lm.get_input_embeddings().weight
    twin = copy.deepcopy(lm).double()
    rollouts = [I.Rollout(tokenizer(t).input_ids, c, 0.0, 0.0, False) for t, c in
                (("What is 2 + 3?", [5, 9, 11]), ("x", [7, 8]), ("Let x = 4.", [3, 4, 5, 6]))]  # fmt: skip
    scorer = I.CompletionLogProbs(lm, 0.7, chunk_size=3, vocab_chunk=50)
    for part in (rollouts[:2], rollouts[2:]):
        batch = I.collate(part, tokenizer.pad_token_id, "cpu")
        (scorer(*batch)["logp"] * batch.completion_mask).sum().backward()
        ids, mask, n_prompt, cmask = batch
        logits = twin(input_ids=ids, attention_mask=mask, position_ids=I.positions(mask)).logits[:, n_prompt - 1 : -1]
        logp = torch.log_softmax(logits / 0.7, -1).gather(2, ids[:, n_prompt:, None]).squeeze(2)
        (logp * cmask).sum().backward()
    for (name, p), q in zip(lm.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- sampling: alignment, padding, EOS
def test_sampled_self_certainty_and_logprobs_match_unpadded_full_forward(tokenizer):
    lm = make_model(tokenizer, seed=3, head_scale=4.0)
    prompts = [tokenizer(t).input_ids for t in ("What is 2 + 3?", "Compute 7 * 6 = 42, so the final answer", "x")]
    assert len({len(p) for p in prompts}) == 3  # different lengths -> left padding
    stop = list(range(40, 52))  # many stop ids, so sequences end at different steps
    torch.manual_seed(0)
    rollouts = I.sample(lm, prompts, 3, 24, 1.0, stop, tokenizer.pad_token_id)
    lengths = [len(r.completion) for r in rollouts]
    assert len(set(lengths)) > 2 and any(not r.truncated for r in rollouts) and any(r.truncated for r in rollouts)
    for r in rollouts:
        assert r.truncated == (r.completion[-1] not in stop)
        assert all(t not in stop for t in r.completion[:-1])

    # independent reference: each sequence alone, no padding, no cache, full logits in float64
    scorer = I.CompletionLogProbs(lm, 0.8, chunk_size=5, vocab_chunk=64)
    with torch.no_grad():
        batched = scorer(*I.collate(rollouts, tokenizer.pad_token_id, "cpu"), with_certainty=True)
        for k, r in enumerate(rollouts):
            ids = torch.tensor([r.prompt + r.completion])
            logits = lm(input_ids=ids).logits[0, len(r.prompt) - 1 : -1].double()  # position i-1 predicts i
            assert r.self_certainty == pytest.approx(naive_self_certainty(logits).mean().item(), abs=1e-4)
            n = len(r.completion)
            # the sampler's per-token statistics (temperature 1) and their means
            p = torch.softmax(logits, -1)
            chosen = torch.log(p).gather(1, torch.tensor(r.completion)[:, None]).squeeze(1)
            naive_entropy = -(p * torch.log(p)).sum(-1)
            for kept, naive in ((r.token_certainty, naive_self_certainty(logits)), (r.token_entropy, naive_entropy),
                                (r.token_logp, chosen)):  # fmt: skip
                assert kept.dtype == torch.float32 and kept.device.type == "cpu" and kept.shape == (n,)
                torch.testing.assert_close(kept.double(), naive, atol=1e-4, rtol=1e-4)
            assert r.self_certainty == pytest.approx(r.token_certainty.sum().item() / n, rel=1e-6)
            assert r.entropy == pytest.approx(r.token_entropy.mean().item(), rel=1e-5, abs=1e-6)
            torch.testing.assert_close(
                batched["self_certainty"][k, :n].double(), naive_self_certainty(logits), atol=1e-4, rtol=1e-4
            )
            ref_logp = torch.log_softmax(logits / 0.8, -1).gather(1, torch.tensor(r.completion)[:, None]).squeeze(1)
            torch.testing.assert_close(batched["logp"][k, :n].double(), ref_logp, atol=1e-4, rtol=1e-4)
            assert (batched["logp"][k, n:] == 0).all()


def test_greedy_groups_are_identical_and_prompt_is_shared(tokenizer):
    lm = make_model(tokenizer, seed=4, head_scale=4.0)
    prompts = [tokenizer("What is 2 + 3?").input_ids, tokenizer("y").input_ids]
    rollouts = I.sample(lm, prompts, 2, 10, 0.0, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert rollouts[0].completion == rollouts[1].completion and rollouts[2].completion == rollouts[3].completion
    assert [r.prompt for r in rollouts] == [prompts[0]] * 2 + [prompts[1]] * 2
    alone = I.sample(lm, prompts[1:], 1, 10, 0.0, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert alone[0].completion == rollouts[2].completion  # padding changes nothing


# ---------------------------------------------------------------- advantages and loss
def test_group_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    a = I.group_advantages(r, 3)
    torch.testing.assert_close(a[:3], torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-4))  # unbiased std of 1,2,3 is 1
    assert torch.equal(a[3:], torch.zeros(3))  # all-equal group: zero, not NaN
    mixed = mixed_advantages({"self_certainty": r}, {"self_certainty": -2.0}, 3)
    torch.testing.assert_close(mixed, -2.0 * a)


def test_loss_at_ratio_one_is_the_policy_gradient():
    torch.manual_seed(5)
    logp = torch.randn(3, 4).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss, kl, clipped = loss_terms(logp, logp.detach(), logp.detach(), adv, 0.0, 0.2, 0.2)
    I.aggregate_loss(loss, mask, "token", mask.sum(), 3).backward()
    expected = -adv[:, None] * mask / mask.sum()  # grad of -(1/N) sum_t A log pi
    torch.testing.assert_close(logp.grad, expected)
    assert not clipped.any()
    logp.grad = None
    loss, _, _ = loss_terms(logp, logp.detach(), logp.detach(), adv, 0.0, 0.2, 0.2)
    I.aggregate_loss(loss, mask, "grpo", mask.sum(), 3).backward()
    torch.testing.assert_close(logp.grad, -adv[:, None] * mask / mask.sum(1, keepdim=True) / 3)


def test_no_gradient_where_clipping_binds_and_k3_kl():
    logp = torch.zeros(1, 4, requires_grad=True)
    old = torch.log(torch.tensor([[0.5, 0.9, 1.0, 1.5]]))  # ratio = 2.0, 1.11, 1.0, 0.67
    for a, bound in ((1.0, [True, False, False, False]), (-1.0, [False, False, False, True])):
        logp.grad = None
        loss, _, clipped = loss_terms(logp, old, logp.detach(), torch.tensor([a]), 0.0, 0.2, 0.2)
        loss.sum().backward()
        assert clipped[0].tolist() == bound
        assert ((logp.grad[0] == 0) == torch.tensor(bound)).all()
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    _, kl, _ = loss_terms(lp, lp, lp.clone(), torch.zeros(1), 0.1, 0.2, 0.2)
    assert torch.equal(kl, torch.zeros_like(kl))  # policy == reference
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    _, kl, _ = loss_terms(lp, lp, ref, torch.zeros(1), 0.1, 0.2, 0.2)
    d = (ref - lp).double()
    torch.testing.assert_close(kl.double(), torch.exp(d) - d - 1)
    assert (kl[0, :2] > 0).all() and kl[0, 2] == 0


def fixed_rollouts(tokenizer, lm, n_prompts=2, G=3):
    torch.manual_seed(7)
    prompts = [tokenizer(t).input_ids for t in ("What is 2 + 3?", "Let x = 4.")][:n_prompts]
    rollouts = I.sample(lm, prompts, G, 12, 1.0, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    rewards = I.compute_rewards(rollouts, {"self_certainty": 1.0}, G, I.Args())
    for r, a in zip(rollouts, mixed_advantages(rewards, {"self_certainty": 1.0}, G).tolist()):
        r.advantage = a
    return rollouts


def one_update(tokenizer, rollouts, micro_batch_size, loss_type):
    lm = make_model(tokenizer, seed=6, head_scale=4.0)
    ref = I.CompletionLogProbs(make_model(tokenizer, seed=6, head_scale=3.0), 1.0, 8, 64)
    opt = torch.optim.SGD(lm.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    m = I.optimize(
        I.CompletionLogProbs(lm, 1.0, 8, 64),
        ref,
        opt,
        sched,
        rollouts,
        tokenizer.pad_token_id,
        I.Args(
            beta=0.05,
            loss_type=loss_type,
            micro_batch_size=micro_batch_size,
            max_grad_norm=1e9,
        ),
    )
    return lm, m


@pytest.mark.parametrize("loss_type", ["token", "grpo"])
def test_update_does_not_depend_on_micro_batch_size(tokenizer, loss_type):
    rollouts = fixed_rollouts(tokenizer, make_model(tokenizer, seed=6, head_scale=4.0))
    (a, ma), (b, mb) = one_update(tokenizer, rollouts, 6, loss_type), one_update(tokenizer, rollouts, 1, loss_type)
    assert ma["kl"] > 0 and ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- the script end to end
def run(*argv, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "intuitor.py"), *argv], capture_output=True, text=True, env=env
    )
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def small_run(model, out, *extra, check=True):
    flags = [
        "--prompts_per_step",
        "2",
        "--num_generations",
        "4",
        "--max_completion_length",
        "16",
        "--micro_batch_size",
        "3",
    ]
    return run("--model", model, "--dataset", DATA, *flags, "--output_dir", str(out), *extra, check=check)


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_script_writes_metrics_and_loadable_checkpoint(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    small_run(tiny_dir, tmp_path, "--max_steps", "3", "--save_steps", "2")
    recs = metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3]
    for key in (
        "train/self_certainty",
        "train/self_certainty_std",
        "train/completion_length",
        "train/completion_length_max",
        "train/truncated_frac",
        "train/kl",
        "train/clip_frac",
        "train/loss",
        "train/grad_norm",
        "train/lr",
        "perf/sample_tokens_per_s",
        "perf/sample_s",
        "perf/update_s",
    ):
        assert all(math.isfinite(r[key]) for r in recs), key
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3", "metrics.jsonl"]
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-3")
    before = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert any(not torch.equal(a, b) for a, b in zip(lm.parameters(), before.parameters()))


def test_final_checkpoint_false_writes_only_the_periodic_ones(tiny_dir, tmp_path):
    p = small_run(tiny_dir, tmp_path, "--max_steps", "3", "--save_steps", "2", "--final_checkpoint", "false")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "metrics.jsonl"]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    assert "done: no checkpoint at the end (--final_checkpoint false)" in p.stdout


def test_resume_equals_uninterrupted_run(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    small_run(tiny_dir, a, "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-3")
    os.makedirs(b)
    shutil.copytree(a / "checkpoint-2", b / "checkpoint-2")  # what a run stopped after step 2 leaves behind
    small_run(tiny_dir, b, "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-3", "--resume")
    wa, wb = load_file(a / "checkpoint-4" / "model.safetensors"), load_file(b / "checkpoint-4" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["step"] for r in metrics(b)] == [3, 4]
    assert metrics(a)[2:] == [
        {**r, **{k: v for k, v in m.items() if k.startswith("perf/")}} for r, m in zip(metrics(b), metrics(a)[2:])
    ]


def test_training_raises_self_certainty_and_negated_control_does_not(tokenizer, tmp_path):
    # A random tiny model is near-uniform, so any weight drift would raise its self-certainty; start from an
    # opinionated one (large lm_head) and compare against the same run with the reward negated. The learning
    # rate is small on purpose: with Adam at large rates, sampling noise alone sharpens the policy and the
    # negated control rises too (seen at 1e-3 here).
    path = str(tmp_path / "model")
    make_model(tokenizer, seed=11, head_scale=10.0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    gain = {}
    for sign in ("1", "-1"):
        out = tmp_path / f"run{sign}"
        run(
            "--model",
            path,
            "--dataset",
            DATA,
            "--prompts_per_step",
            "4",
            "--num_generations",
            "8",
            "--max_completion_length",
            "8",
            "--micro_batch_size",
            "8",
            "--output_dir",
            str(out),
            "--max_steps",
            "30",
            "--learning_rate",
            "2e-4",
            "--beta",
            "0",
            "--warmup_ratio",
            "0",
            "--reward",
            f"self_certainty={sign}",
            "--save_steps",
            "0",
        )
        curve = [r["train/self_certainty"] for r in metrics(out)]
        gain[sign] = sum(curve[-5:]) / 5 - sum(curve[:5]) / 5
    assert gain["1"] > 0.3, gain
    assert gain["-1"] < 0.1, gain


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--prompt_column", "question"], "--prompt_column"),
        (["--num_generations", "1"], "--num_generations"),
        (["--model", "./no/such/model"], "--model"),
        (["--prompts_per_step", "100"], "--prompts_per_step"),
        (["--reward", "gold"], "--reward"),
    ],
)
def test_bad_input_fails_with_one_clear_line(tiny_dir, tmp_path, argv, needle):
    out = tmp_path / "out"
    args = dict(
        zip(
            ["--model", "--dataset", "--output_dir", "--prompts_per_step", "--num_generations"],
            [tiny_dir, DATA, str(out), "2", "4"],
        )
    )
    args.update(zip(argv[::2], argv[1::2]))
    p = run(*[x for kv in args.items() for x in kv], check=False)
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len(err) == 1 and needle in err[0], p.stderr
    assert not out.exists()  # nothing half-written


def test_reused_rollouts_gradient_checkpointing_and_grpo_loss(tiny_dir, tmp_path):
    # mu = 2: the second optimizer step reuses the rollouts, with rho against the stored sampling log-probs
    small_run(
        tiny_dir,
        tmp_path,
        "--max_steps",
        "2",
        "--num_iterations",
        "2",
        "--gradient_checkpointing",
        "--loss_type",
        "grpo",
        "--learning_rate",
        "5e-2",
        "--save_steps",
        "0",
    )
    recs = metrics(tmp_path)
    assert len(recs) == 2 and all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in recs)
    assert any(r["train/clip_frac"] > 0 for r in recs)  # pi moved away from pi_old in the second pass
    state = torch.load(tmp_path / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 4  # 2 steps x 2 optimizer steps each
