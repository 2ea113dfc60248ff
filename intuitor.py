"""
INTUITOR in one file: GRPO whose only reward is the model's own self-certainty
("Learning to Reason without External Rewards", Zhao et al., arXiv 2505.19590).

    1 GPU / CPU : python intuitor.py --model Qwen/Qwen2.5-1.5B
    8 GPUs      : torchrun --standalone --nproc_per_node=8 intuitor.py --model Qwen/Qwen2.5-1.5B
    curves      : python intuitor.py plot runs/intuitor/metrics.jsonl

The algorithm, one optimizer step (paper Sec. 3, Eq. 3-5):
  1. sample G completions o_1..o_G per prompt q from the current policy (temperature tau);
  2. reward each by its self-certainty SC(o|q) = 1/|o| sum_i KL(U || p(.|q, o_<i)), read off the logits
     the sampler computes anyway (no extra forward pass, temperature 1 = the raw distribution);
  3. group-normalise rewards into advantages A = (SC - mean_G) / (std_G + 1e-4);
  4. minimise the clipped surrogate + beta * KL(pi || pi_ref) with the k3 estimator.

The file reads in that order, then the loop; appendices hold a vocabulary-streamed lm_head (no tokens x |V|
tensor, forward or backward) and a fixed-shape sampler for GPUs. common.py: what training and eval.py share.
Before you fork: token i is scored at position i-1 (the official `logits[:, -C:]` is off by one); on GPU the
policy keeps fp32 master weights under bf16 autocast; every step re-seeds from (seed, step, rank), so a resumed
run samples what an uninterrupted one would; a prompt's G completions share a rank; the loss normaliser is global.
"""

import copy
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import common
from common import die

SYSTEM_PROMPT = (
    "You are a helpful AI Assistant, designed to provided well-reasoned and detailed responses. You FIRST "
    "think about the reasoning process step by step and then provide the user with the answer. Please enclose "
    "your final answer in the box: \\boxed{Your Answer}. Please stop generation immediately after outputing "
    "the box."
)


# ----------------------------------------------------------------------------- arguments
def arg(default, help):  # a command-line flag: its default and its line in --help
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # model and data
    model: str = arg("Qwen/Qwen2.5-1.5B", "hub id, local directory or local .gguf file")
    dataset: str = arg("DigitalLearningGmbH/MATH-lighteval", "hub dataset or local .json/.jsonl/.parquet")
    dataset_split: str = arg("train", "split of a hub dataset")
    prompt_column: str = arg("problem", "column holding the question")
    answer_column: str = arg("", "gold answers (accuracy reward/monitor); default `answer`, else `solution`")
    answer_format: Literal["auto", "boxed", "number"] = arg(
        "auto", "final answer: last \\boxed{}, or else the last number; auto = number if gold answers are '#### N'"
    )
    system_prompt: str = arg(SYSTEM_PROMPT, "system message of the chat template ('' for none)")
    # sampling (step 1)
    num_generations: int = arg(7, "G: completions sampled per prompt (group size)")
    prompts_per_step: int = arg(128, "prompts per optimizer step, summed over all ranks")
    generation_batch_size: int = arg(0, "sequences sampled at once per rank; 0 = all of the step")
    max_prompt_length: int = arg(512, "longer prompts are skipped (and counted)")
    max_completion_length: int = arg(3072, "new tokens per completion")
    temperature: float = arg(0.9, "sampling temperature; log-probs use logits / temperature")
    top_k: int = arg(0, "sample from the k most likely tokens; 0 = all (the official recipes: 50)")
    top_p: float = arg(1.0, "nucleus sampling: the smallest set of tokens with this much probability; 1 = all")
    sampler: Literal["eager", "static"] = arg("eager", "static: fixed-shape KV cache, a CUDA graph per step on GPU")
    sampling_weights: Literal["autocast", "bf16"] = arg("autocast", "GPU: autocast over fp32 weights, or a bf16 copy")
    # reward (step 2)
    reward: str = arg("self_certainty", "a name in REWARDS, or a weighted mix 'self_certainty=1,accuracy=0.5'")
    certainty_model: Literal["policy", "reference"] = arg("policy", "who scores self-certainty: online or frozen")
    # loss and optimizer (steps 3-4)
    beta: float = arg(0.005, "weight of KL(pi || pi_ref); 0 skips the reference model")
    epsilon: float = arg(0.2, "lower clip range: ratio >= 1 - epsilon")
    epsilon_high: float = arg(0.2, "upper clip range: ratio <= 1 + epsilon_high")
    loss_type: Literal["token", "grpo"] = arg("token", "token: mean over the step's tokens; grpo: over sequences")
    num_iterations: int = arg(1, "mu: optimizer steps per batch of rollouts")
    mask_truncated_completions: bool = arg(False, "completions cut by max_completion_length take no part in the loss")
    micro_batch_size: int = arg(4, "sequences per forward/backward (gradient accumulation)")
    learning_rate: float = arg(3e-6, "AdamW peak learning rate")
    warmup_ratio: float = arg(0.1, "fraction of optimizer steps with linear warmup before the cosine decay")
    max_grad_norm: float = arg(1.0, "gradient-norm clipping")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_steps: int = arg(-1, "rollout steps; -1 = one epoch over the prompts")
    seed: int = arg(42, "seed for the data order and sampling")
    # run, checkpoints, logging
    output_dir: str = arg("runs/intuitor", "metrics.jsonl and checkpoint-N/ go here")
    save_steps: int = arg(50, "checkpoint every N steps (and at the end); 0 = only at the end")
    resume: bool = arg(False, "continue the run in output_dir from its latest readable checkpoint")
    overwrite_output_dir: bool = arg(False, "replace the run already in output_dir")
    save_total_limit: int = arg(2, "keep the newest N checkpoints (the older one backs up a torn newest); 0 = all")
    log_completions_steps: int = arg(10, "print a sample completion every N steps; 0 = never")
    report_to: Literal["none", "tensorboard", "wandb"] = arg("none", "also log to (metrics.jsonl is always written)")
    # memory and precision
    chunk_size: int = arg(1024, "tokens per chunk of the streamed lm_head")
    vocab_chunk_size: int = arg(4096, "vocabulary slice of the streamed lm_head")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward")
    dtype: Literal["auto", "float32", "bfloat16"] = arg("auto", "auto = bf16 autocast on CUDA, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = arg("auto", "auto = cuda when available")


# ----------------------------------------------------------------------------- 1. sampling
@dataclass
class Rollout:
    """One sampled completion and what the step learns about it; each field is filled by the stage named."""

    # sample(): the completion and the sampling distribution's statistics
    prompt: list  # prompt token ids (unpadded)
    completion: list  # sampled token ids, ending with a stop token unless truncated
    self_certainty: float  # Eq. 4 under the policy that sampled it: the online INTUITOR reward
    entropy: float  # mean token entropy (nats) of the same distributions
    truncated: bool  # cut off by max_completion_length
    # grade(): only when a reward or the accuracy monitor needs the final answer
    answer: str | None = None  # extracted final answer
    correct: bool = False  # answer equals the gold one
    # reference_pass(): only when beta > 0 or certainty_model == "reference"
    ref_logp: torch.Tensor | None = None  # per-token log-probs under the frozen initial model, for the KL
    self_certainty_ref: float | None = None  # Eq. 4 under the frozen initial model: the offline reward
    # train loop: group-normalised reward (Eq. 3)
    advantage: float = 0.0


def certainty_from(lse, mean_logit, vocab_size):
    """Self-certainty (paper Eq. 4) from two statistics of the logits z:
    KL(U || softmax(z)) = logsumexp(z) - mean(z) - log|V|. Zero for a uniform distribution, positive otherwise.
    The only definition: the sampler feeds it full logits, the streamed lm_head its running logsumexp."""
    return lse - mean_logit - math.log(vocab_size)


def self_certainty(logits):
    """Self-certainty per position of logits (..., V), in float32 (float64 stays float64)."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return certainty_from(torch.logsumexp(z, -1), z.mean(-1), z.shape[-1])


def entropy(logits):
    """Token entropy H(p) = logsumexp(z) - sum_j p_j z_j (nats); its negative is the `neg_entropy` reward."""
    z = logits.float()
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


@torch.no_grad()
def sample(lm, prompts, num_generations, max_new_tokens, temperature, stop_ids, pad_id, top_k=0, top_p=1.0):
    """Sample G completions per prompt with a KV cache, accumulating self-certainty on the way.

    Each prompt is prefilled once (left-padded, positions counted from its first real token) and its cache
    shared by its G samples. The logits that pick token i are the ones that predict it, so SC(o|q) (Eq. 4)
    costs no extra pass. temperature 0 = greedy. One Rollout per sequence, a prompt's G samples adjacent."""
    device = next(lm.parameters()).device
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(num_generations)
    logits = out.logits[:, -1].float().repeat_interleave(num_generations, 0)
    if not torch.isfinite(logits).all():
        die("the model's logits hold NaN/inf: its weights are broken (a diverged run?); lower --learning_rate")
    mask = mask.repeat_interleave(num_generations, 0)
    pos = pos[:, -1:].repeat_interleave(num_generations, 0)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)

    n = logits.shape[0]
    rows = torch.arange(n, device=device)  # which sequence each row of the shrinking batch belongs to
    certainty_sum, entropy_sum, length = (torch.zeros(n, device=device) for _ in range(3))
    tokens = torch.full((n, max_new_tokens), pad_id, device=device)
    for t in range(max_new_tokens):
        certainty_sum[rows] += self_certainty(logits)
        entropy_sum[rows] += entropy(logits)
        next_token = choose_tokens(logits, temperature, top_k, top_p)
        tokens[rows, t] = next_token
        length[rows] += 1
        done = torch.isin(next_token, stop)
        if done.all() or t == max_new_tokens - 1:
            break
        if done.any():  # finished sequences leave the batch (and the KV cache): no compute is spent on them
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, next_token, mask, pos = rows[keep], next_token[keep], mask[keep], pos[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos + 1
        inputs = dict(input_ids=next_token[:, None], attention_mask=mask, position_ids=pos)
        logits = lm(**inputs, past_key_values=cache, use_cache=True).logits[:, -1].float()

    truncated = torch.zeros(n, dtype=torch.bool, device=device)
    truncated[rows[~done]] = True  # still running at the last step: cut off by max_new_tokens
    return to_rollouts(prompts, num_generations, tokens, length, certainty_sum, entropy_sum, truncated)


def choose_tokens(logits, temperature, top_k=0, top_p=1.0):
    """Each row's next token: drawn from common.sampling_logits, or the most likely one at temperature 0."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(common.sampling_logits(logits, temperature, top_k, top_p), -1), 1).squeeze(1)


def to_rollouts(prompts, num_generations, tokens, length, certainty_sum, entropy_sum, truncated):
    """One Rollout per sequence, with its per-token means of self-certainty and entropy."""
    rollouts = []
    for k, n_tokens in enumerate(length.long().tolist()):
        sc, ent = certainty_sum[k].item() / n_tokens, entropy_sum[k].item() / n_tokens
        completion = tokens[k, :n_tokens].tolist()
        rollouts.append(Rollout(prompts[k // num_generations], completion, sc, ent, bool(truncated[k])))
    return rollouts


# ----------------------------------------------------------------------------- 2. rewards
def grade(rollouts, golds, tokenizer, num_generations, answer_format="boxed"):
    """Extract each completion's final answer (common.extract_answer) and compare it with its prompt's gold one."""
    for k, r in enumerate(rollouts):
        r.answer = common.extract_answer(tokenizer.decode(r.completion, skip_special_tokens=True), answer_format)
        r.correct = common.is_correct(r.answer, golds[k // num_generations])


def online_self_certainty(rollouts, num_generations):
    """INTUITOR: the policy's own self-certainty, accumulated by the sampler."""
    return [r.self_certainty for r in rollouts]


def offline_self_certainty(rollouts, num_generations):
    """Self-certainty scored by the frozen initial model (paper Fig. 7), from the reference pass."""
    return [r.self_certainty_ref for r in rollouts]


def neg_entropy(rollouts, num_generations):
    """Minus the mean token entropy of the sampling distribution."""
    return [-r.entropy for r in rollouts]


def accuracy(rollouts, num_generations):
    """GRPO: 1 when the final answer matches the gold one."""
    return [float(r.correct) for r in rollouts]


def plurality(rollouts, num_generations):
    """GRPO-PV: 1 when the final answer matches the plurality answer of its group (no gold needed)."""
    groups = [rollouts[i : i + num_generations] for i in range(0, len(rollouts), num_generations)]
    return [vote for group in groups for vote in common.plurality_votes([r.answer for r in group])]


# A reward is a function (rollouts, group size) -> one float per rollout; register it here to make it a flag.
REWARDS = {
    "self_certainty": online_self_certainty,
    "accuracy": accuracy,
    "plurality": plurality,
    "neg_entropy": neg_entropy,
}
NEEDS_ANSWERS = {"accuracy", "plurality"}


def compute_rewards(rollouts, names, num_generations, certainty_model="policy"):
    """Every named reward of every rollout, as tensors; certainty_model 'reference' makes SC the offline one."""
    offline = {"self_certainty": offline_self_certainty} if certainty_model == "reference" else {}
    fns = {name: offline.get(name, REWARDS[name]) for name in names}
    return {name: torch.tensor(fn(rollouts, num_generations), dtype=torch.float32) for name, fn in fns.items()}


# ----------------------------------------------------------------------------- 3. advantages and loss
def group_advantages(rewards, num_generations, eps=1e-4):
    """GRPO advantages (paper Eq. 3): A_i = (r_i - mean(r_group)) / (std(r_group) + eps).

    std is the unbiased sample std, as in TRL; a group of equal rewards gets exactly A = 0, never NaN."""
    r = rewards.view(-1, num_generations)
    advantages = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    equal = r.amax(1, keepdim=True) == r.amin(1, keepdim=True)  # exactly 0: float rounding of the mean is not
    return torch.where(equal, 0.0, advantages).view(-1)  # allowed to push identical completions anywhere


def mixed_advantages(rewards, weights, num_generations):
    """Each reward is normalised within its group separately, then weighted and summed (the official
    implementation's semantics for several rewards); weight 0 logs a reward without training on it."""
    return sum(w * group_advantages(rewards[name], num_generations) for name, w in weights.items())


def per_token_loss(logp, old_logp, ref_logp, advantages, beta, epsilon, epsilon_high):
    """Clipped surrogate with KL penalty (paper Eq. 5), per token:

        -[min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) - beta KL],  rho = pi / pi_old,
        KL = exp(ref - logp) - (ref - logp) - 1   (k3 estimator of KL(pi || pi_ref), >= 0).

    Returns the loss, the KL and where clipping binds (zero gradient there), all (B, C)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon_high) * adv)
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1 if beta else torch.zeros_like(logp)
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return -(surrogate - beta * kl), kl, clipped


def aggregate_loss(loss, completion_mask, loss_type, total_tokens, total_sequences):
    """This micro-batch's share of the step's loss. `token`: sum over its tokens / all tokens of the
    step; `grpo`: sum of its per-sequence means / all sequences of the step. The totals are global
    (all ranks, all micro-batches), so the summed gradient does not depend on how the step is split."""
    loss = loss * completion_mask
    if loss_type == "token":
        return loss.sum() / total_tokens
    return (loss.sum(1) / completion_mask.sum(1).clamp(min=1)).sum() / total_sequences


# ----------------------------------------------------------------------------- 4. the update
@torch.no_grad()
def reference_pass(ref, rollouts, micro_batch_size, pad_id, autocast=nullcontext):
    """One forward of the frozen initial model over the rollouts: per-token log-probs for the KL term and,
    from the same streamed pass, offline self-certainty (paper Fig. 7). Stored on each rollout."""
    for part, batch in common.micro_batches(rollouts, micro_batch_size, pad_id, next(ref.parameters()).device):
        with autocast():
            stats = ref(*batch)
        for k, r in enumerate(part):
            n = len(r.completion)
            r.ref_logp = stats["logp"][k, :n]
            r.self_certainty_ref = stats["self_certainty"][k, :n].mean().item()


class UpdateConfig(NamedTuple):
    """The hyperparameters of one update: Eq. 5 (beta, clip range, loss averaging) and how it is run."""

    beta: float = 0.005
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "token"
    micro_batch_size: int = 4
    num_iterations: int = 1  # mu: optimizer steps on the same rollouts
    max_grad_norm: float = 1.0
    mask_truncated_completions: bool = False  # truncated completions take no part in the loss


def optimize(model, optimizer, scheduler, rollouts, pad_id, config, autocast=nullcontext):
    """Minimise Eq. 5 over one batch of rollouts (advantages set; ref_logp too when beta > 0): num_iterations
    optimizer steps, each accumulating gradients over micro-batches. `model` is a CompletionLogProbs,
    possibly DDP-wrapped. An optimizer step whose gradient norm is not finite is skipped (and counted).
    Returns the step's metrics, averaged over the num_iterations passes."""
    beta, epsilon, epsilon_high, loss_type, micro_batch_size, num_iterations, max_grad_norm, mask_truncated = config
    scorer = getattr(model, "module", model)
    device = next(scorer.parameters()).device
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    parts = common.micro_batches(rollouts, micro_batch_size, pad_id, device)
    advantages = [torch.tensor([r.advantage for r in part], device=device) for part, _ in parts]
    in_loss = [torch.tensor([not (mask_truncated and r.truncated) for r in part], device=device) for part, _ in parts]
    kept = [r for r in rollouts if not (mask_truncated and r.truncated)]
    total_tokens = max(common.all_reduce(sum(len(r.completion) for r in kept)).item(), 1)
    total_sequences = max(common.all_reduce(len(kept)).item(), 1)

    # When rollouts are reused (mu > 1), rho needs the sampling policy's log-probs, frozen before the first
    # update; with mu = 1, pi_old = pi exactly and rho = exp(logp - logp.detach()) = 1 with the right gradient.
    with torch.no_grad(), autocast():
        old_logps = [scorer(*batch)["logp"] if num_iterations > 1 else None for _, batch in parts]
    pad = torch.nn.utils.rnn.pad_sequence
    ref_logps = [pad([r.ref_logp for r in part], batch_first=True).to(device) if beta else None for part, _ in parts]

    metrics = dict(loss=0.0, kl=0.0, clip_frac=0.0, grad_norm=0.0, skipped_updates=0)
    for _ in range(num_iterations):
        for j, (_, batch) in enumerate(parts):
            last = j == len(parts) - 1
            sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync, autocast():
                logp = model(*batch)
                old_logp = old_logps[j] if old_logps[j] is not None else logp.detach()
                ref_logp = ref_logps[j] if ref_logps[j] is not None else logp.detach()
                losses, kl, clipped = per_token_loss(
                    logp, old_logp, ref_logp, advantages[j], beta, epsilon, epsilon_high
                )
                mask = batch.completion_mask & in_loss[j][:, None]
                loss = aggregate_loss(losses, mask, loss_type, total_tokens, total_sequences)
                # DDP averages gradients over ranks; the normaliser is already global, so undo the average.
                (loss * world_size).backward()
            metrics["loss"] += loss.item() / num_iterations
            metrics["kl"] += (kl * mask).sum().item() / total_tokens / num_iterations
            metrics["clip_frac"] += (clipped & mask).sum().item() / total_tokens / num_iterations
        metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(scorer.parameters(), max_grad_norm).item()
        if math.isfinite(metrics["grad_norm"]):  # the same on every rank: gradients are already all-reduced
            optimizer.step()
        else:  # a NaN/inf loss or gradient never reaches the weights
            metrics["skipped_updates"] += 1
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    for key in ("loss", "kl", "clip_frac"):
        metrics[key] = common.all_reduce(metrics[key]).item()
    return metrics


# ----------------------------------------------------------------------------- training loop
@dataclass
class Trainer:  # what the loop needs, built once by setup()
    rt: common.Runtime
    lm: torch.nn.Module  # the policy (a transformers causal LM): sampled from, updated, saved
    sampling_lm: torch.nn.Module  # lm itself, or its bf16 copy (--sampling_weights bf16)
    model: torch.nn.Module  # the same weights as a CompletionLogProbs scorer, DDP-wrapped on several ranks
    ref: torch.nn.Module | None  # the frozen initial model as a scorer (KL term, offline self-certainty)
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    prompts: list  # every Prompt of the dataset
    stop_ids: list  # token ids that end a completion
    start_step: int
    max_steps: int
    metrics_path: str
    answer_format: str  # how final answers are read: "boxed" or "number"


def setup(args):
    """Flags, output directory and data are checked before any model loads; then policy, reference,
    optimizer and schedule, resumed from the newest readable checkpoint with --resume."""
    rt = common.runtime_from_env(args.device, args.dtype)
    common.check_train_args(args, rt.world_size)
    weights = common.parse_reward(args.reward, REWARDS)
    lock = common.check_output_dir(args.output_dir, args.resume, args.overwrite_output_dir) if rt.rank == 0 else None
    rows, questions, golds = common.load_questions(
        args.dataset, args.dataset_split, args.prompt_column, args.answer_column, need_gold="accuracy" in weights
    )
    ckpt, state = common.resume_state(args.output_dir, "cpu") if args.resume else (None, None)
    if state is not None:
        common.check_same_run(state["args"], asdict(args), common.MAY_CHANGE_ON_RESUME)
    common.init_distributed(rt)
    lm, tokenizer = common.load_model(ckpt or args.model, rt.device)
    n_params = sum(p.numel() for p in lm.parameters())
    common.check_memory(common.memory_plan(lm.config, n_params, args, rt.world_size, rt.bf16), rt)
    prompts, skipped = common.load_prompts(questions, golds, tokenizer, args.system_prompt, args.max_prompt_length)
    if len(prompts) < args.prompts_per_step:
        die(f"only {len(prompts)} prompts fit --max_prompt_length ({skipped} longer); lower --prompts_per_step")

    ref = None
    if args.beta > 0 or args.certainty_model == "reference":
        ref_lm = common.load_model(args.model, rt.device)[0] if ckpt else copy.deepcopy(lm)
        ref_lm.requires_grad_(False).eval().to(torch.bfloat16 if rt.bf16 else torch.float32)
        ref = CompletionLogProbs(ref_lm, args.temperature, args.chunk_size, args.vocab_chunk_size)
    bf16_copy = args.sampling_weights == "bf16"  # GPU option: sample from a bf16 copy, refreshed after updates
    sampling_lm = copy.deepcopy(lm).requires_grad_(False).eval().to(torch.bfloat16) if bf16_copy else lm
    max_steps = args.max_steps if args.max_steps > 0 else len(prompts) // args.prompts_per_step
    optimizer, scheduler = common.make_optimizer(lm, args, max_steps * args.num_iterations, state)
    if args.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = CompletionLogProbs(lm, args.temperature, args.chunk_size, args.vocab_chunk_size)
    if rt.world_size > 1:
        device_ids = [rt.local_rank] if rt.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    start_step, metrics_path = state["step"] if state else 0, os.path.join(args.output_dir, "metrics.jsonl")
    if rt.rank == 0:
        common.open_output_dir(args.output_dir, args.overwrite_output_dir, lock)
        common.restart_metrics(metrics_path, start_step)
        resumed = f", resumed from {ckpt}" if ckpt else ""
        tqdm.write(f"{len(prompts)} prompts ({skipped} too long, skipped), {max_steps} steps, {rt}{resumed}")
    stop_ids = common.stop_token_ids(tokenizer, lm)
    parts = (lm, sampling_lm, model, ref, tokenizer, optimizer, scheduler, prompts, stop_ids)
    answer_format = common.infer_answer_format(rows, args.answer_column, args.answer_format)
    return Trainer(rt, *parts, start_step, max_steps, metrics_path, answer_format)


def train(args):
    tr = setup(args)
    G, pad_id, rank = args.num_generations, tr.tokenizer.pad_token_id, tr.rt.rank
    weights = common.parse_reward(args.reward, REWARDS)
    per_call = args.generation_batch_size // G or len(tr.prompts)  # prompts sampled at once (0 = all)
    has_gold = any(p.gold is not None for p in tr.prompts)  # grade for the reward or for the accuracy monitor
    needs_answers = has_gold or bool(NEEDS_ANSWERS & weights.keys())
    config = UpdateConfig(*(getattr(args, name) for name in UpdateConfig._fields))
    sampler = sample_static if args.sampler == "static" else sample  # the same Rollouts either way
    skipped_in_a_row = 0  # optimizer steps skipped for a non-finite gradient, in a row
    alarm = common.HackingAlarm()  # watches each step's record for reward hacking and collapse
    logger = common.make_logger(args.report_to, args.output_dir, asdict(args)) if rank == 0 else None
    bar = dict(initial=tr.start_step, total=tr.max_steps, disable=not common.progress_bars(rank), desc="steps")
    for step in tqdm(range(tr.start_step, tr.max_steps), **bar):
        common.seed_step(args.seed, step, rank)
        prompts = common.step_prompts(tr.prompts, step, args.prompts_per_step, rank, tr.rt.world_size, args.seed)

        # 1. sample G completions per prompt; the sampler accumulates each one's self-certainty (Eq. 4)
        t0, rollouts = time.time(), []
        tr.lm.eval()
        for i in range(0, len(prompts), per_call):
            with tr.rt.autocast():
                ids = [p.ids for p in prompts[i : i + per_call]]
                knobs = (args.temperature, tr.stop_ids, pad_id, args.top_k, args.top_p)
                rollouts += sampler(tr.sampling_lm, ids, G, args.max_completion_length, *knobs)
        sample_s = time.time() - t0

        # 2. rewards. Final answers are graded only for GRPO / GRPO-PV or the accuracy monitor; the frozen
        #    initial model scores the rollouts for the KL term (and for offline self-certainty)
        t0, lr = time.time(), tr.scheduler.get_last_lr()[0]
        if needs_answers:
            grade(rollouts, [p.gold for p in prompts], tr.tokenizer, G, tr.answer_format)
        if tr.ref is not None:
            reference_pass(tr.ref, rollouts, args.micro_batch_size, pad_id, tr.rt.autocast)
        rewards = compute_rewards(rollouts, weights, G, args.certainty_model)

        # 3. group-normalised advantages (Eq. 3); groups never straddle ranks
        for r, advantage in zip(rollouts, mixed_advantages(rewards, weights, G).tolist()):
            r.advantage = advantage

        # 4. policy update: minimise the clipped surrogate + beta KL (Eq. 5); non-finite updates are skipped
        tr.lm.train()
        update = optimize(tr.model, tr.optimizer, tr.scheduler, rollouts, pad_id, config, tr.rt.autocast)
        update_s = time.time() - t0
        skipped_in_a_row = skipped_in_a_row + 1 if update["skipped_updates"] else 0
        if not common.all_finite(tr.lm):  # a finite gradient, too large a step: stop before anything is saved
            die(f"step {step + 1}: the update made weights NaN/inf; lower --learning_rate")
        if tr.sampling_lm is not tr.lm:
            common.copy_weights(tr.lm, tr.sampling_lm)

        # 5. log the step; checkpoint every save_steps and at the end
        record = common.step_metrics(step + 1, rollouts, rewards, update, lr, has_gold, sample_s, update_s, G)
        warning = alarm.check(record)  # sets monitor/alarm
        if rank == 0:
            common.log_step(tr.metrics_path, record, tr.max_steps, logger)
            if warning:
                print(warning, flush=True)
            if args.log_completions_steps and (step == 0 or (step + 1) % args.log_completions_steps == 0):
                common.show_completion(tr.tokenizer, rollouts[0])
        if skipped_in_a_row >= 3:
            die(f"steps {step - 1}-{step + 1} had a non-finite loss or gradient; lower --learning_rate")
        if (args.save_steps and (step + 1) % args.save_steps == 0) or step + 1 == tr.max_steps:
            if rank == 0:  # never a checkpoint holding a non-finite weight
                state = dict(step=step + 1, optimizer=tr.optimizer.state_dict(), scheduler=tr.scheduler.state_dict())
                state["args"] = asdict(args)
                common.save_checkpoint(args.output_dir, tr.lm, tr.tokenizer, state, args.save_total_limit)
            if tr.rt.world_size > 1:
                dist.barrier()
    if rank == 0:
        print(f"done: {args.output_dir}/checkpoint-{tr.max_steps}; curves: python intuitor.py plot {tr.metrics_path}")
    if tr.rt.world_size > 1:
        dist.destroy_process_group()
    return tr.lm


# ----------------------------------------------------------------------------- appendix: the streamed lm_head
# Scoring a 3k-token completion with a 150k vocabulary would hold a (tokens x |V|) logits tensor (1.7 GB in fp32
# per sequence). Below, the same quantities one (token chunk x vocabulary slice) tile at a time, both directions.
def _lm_head_tile_stats(h, weight, targets, temperature, vocab_chunk, mean_row=None):
    """One token chunk through the lm_head, one vocabulary slice at a time (an online logsumexp keeps a few
    numbers per token): the target log-prob at `temperature` and its logsumexp; given mean_row w̄ (the mean
    row of the lm_head weight), also self-certainty and entropy at temperature 1, as mean_j z_j = h . w̄."""
    n, V = h.shape[0], weight.shape[0]
    lse = torch.full((n,), -math.inf, device=h.device)  # logsumexp of z / T so far
    target = torch.zeros(n, device=h.device)
    # temperature 1, for entropy: running max, sum e^(z - max) and sum e^(z - max) z
    run_max = torch.full((n,), -math.inf, device=h.device)
    exp_sum, exp_z_sum = torch.zeros(n, device=h.device), torch.zeros(n, device=h.device)
    for v0 in range(0, V, vocab_chunk):
        z = (h @ weight[v0 : v0 + vocab_chunk].T).float()
        z_t = z / temperature if temperature != 1 else z
        lse = torch.logaddexp(lse, torch.logsumexp(z_t, -1))
        hit = (targets >= v0) & (targets < v0 + z.shape[1])
        in_slice = (targets - v0).clamp(0, z.shape[1] - 1)[:, None]
        target += torch.where(hit, z_t.gather(1, in_slice).squeeze(1), 0.0)
        if mean_row is not None:  # rescale the running sums whenever the max grows
            new_max = torch.maximum(run_max, z.max(-1).values)
            scale, e = torch.exp(run_max - new_max), torch.exp(z - new_max[:, None])
            exp_sum, run_max = exp_sum * scale + e.sum(-1), new_max
            exp_z_sum = exp_z_sum * scale + e.mul_(z).sum(-1)
    stats = {"logp": target - lse, "lse": lse}
    if mean_row is not None:
        lse1 = run_max + torch.log(exp_sum)
        stats["self_certainty"] = certainty_from(lse1, h.float() @ mean_row, V)
        stats["entropy"] = lse1 - exp_z_sum / exp_sum
    return stats


@torch.no_grad()
def streamed_token_stats(h, weight, targets, temperature=1.0, chunk_size=1024, vocab_chunk=4096):
    """Per-token log p(target) at `temperature`, self-certainty (Eq. 4) and entropy at temperature 1,
    from hidden states (N, H) and lm_head weight (V, H); memory O(chunk_size x vocab_chunk)."""
    row_sum = sum(weight[v0 : v0 + vocab_chunk].float().sum(0) for v0 in range(0, weight.shape[0], vocab_chunk))
    mean_row = row_sum / weight.shape[0]
    chunks = zip(h.split(chunk_size), targets.split(chunk_size))
    parts = [_lm_head_tile_stats(hc, weight, tc, temperature, vocab_chunk, mean_row) for hc, tc in chunks]
    return {key: torch.cat([p[key] for p in parts]) for key in ("logp", "self_certainty", "entropy")}


class StreamedLogProbs(torch.autograd.Function):
    """log softmax(h W^T / T)[target] with a backward that recomputes each (token chunk x vocab slice) tile.

    d logp_i / d z_ij = (1[j = t_i] - p_ij) / T, accumulated tile by tile into grad_h and, for the model's fp32
    weight, into W.grad itself: autograd gets a stride-0 zero, so no second full-size weight gradient exists,
    and DDP's hooks and a tied embedding's gradient still arrive through autograd. One tile of logits at most."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk_size, vocab_chunk):
        chunks = zip(h.split(chunk_size), targets.split(chunk_size))
        parts = [_lm_head_tile_stats(hc, weight, tc, temperature, vocab_chunk) for hc, tc in chunks]
        ctx.save_for_backward(h, weight, targets, torch.cat([p["lse"] for p in parts]))
        ctx.conf = temperature, chunk_size, vocab_chunk
        # backward recomputes the logits: it must do so at the forward's precision, or p = exp(z - lse) drifts
        ctx.amp = h.device.type, torch.is_autocast_enabled(h.device.type), torch.get_autocast_dtype(h.device.type)
        return torch.cat([p["logp"] for p in parts])

    @staticmethod
    def backward(ctx, grad):
        device_type, enabled, dtype = ctx.amp
        h, weight, targets, lse = ctx.saved_tensors
        temperature, chunk_size, vocab_chunk = ctx.conf
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        direct = weight.is_leaf and weight.requires_grad and weight.dtype == torch.float32
        if direct and weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        grad_w = weight.grad if direct else torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):  # recompute as the forward did
            for i in range(0, h.shape[0], chunk_size):
                hc, tc = h[i : i + chunk_size], targets[i : i + chunk_size]
                g = grad[i : i + chunk_size].float() / temperature
                for v0 in range(0, weight.shape[0], vocab_chunk):
                    w = weight[v0 : v0 + vocab_chunk]
                    dz = -torch.exp((hc @ w.T).float() / temperature - lse[i : i + chunk_size, None]) * g[:, None]
                    hit = (tc >= v0) & (tc < v0 + w.shape[0])
                    dz[hit, tc[hit] - v0] += g[hit]
                    grad_h[i : i + chunk_size] += dz @ w.float()
                    grad_w[v0 : v0 + vocab_chunk] += dz.T @ hc.float()
        grad_w = weight.new_zeros(()).expand(weight.shape) if direct else grad_w.to(weight.dtype)
        return grad_h.to(h.dtype), grad_w, None, None, None, None


class CompletionLogProbs(torch.nn.Module):
    """Wraps a causal LM so that forward(*Batch) returns completion-token statistics from hidden states.

    The hidden state at position i-1 predicts token i, so completion token i (column n_prompt + i) is
    scored from column n_prompt + i - 1. DDP wraps this module, so its gradient hooks see the streamed
    lm_head. With grad enabled it returns log-probs (B, C); without, a dict that adds SC and entropy."""

    def __init__(self, lm, temperature, chunk_size, vocab_chunk):
        super().__init__()
        self.lm, self.conf = lm, (temperature, chunk_size, vocab_chunk)

    def forward(self, ids, attention_mask, n_prompt, completion_mask):
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.lm.base_model(input_ids=ids, attention_mask=attention_mask, position_ids=pos, use_cache=False)
        h = out.last_hidden_state[:, n_prompt - 1 : -1][completion_mask]
        targets = ids[:, n_prompt:][completion_mask]
        weight = self.lm.get_output_embeddings().weight

        def scatter(values):  # (tokens,) -> (B, C), zeros on padding
            zeros = torch.zeros(completion_mask.shape, device=values.device)
            return zeros.masked_scatter(completion_mask, values.float())

        if torch.is_grad_enabled():
            return scatter(StreamedLogProbs.apply(h, weight, targets, *self.conf))
        return {key: scatter(v) for key, v in streamed_token_stats(h, weight, targets, *self.conf).items()}


# ----------------------------------------------------------------------------- appendix: a sampler for GPUs
# On a GPU sample() is launch-bound: every decode step issues hundreds of small kernels from Python. Here the KV
# cache is preallocated and no tensor changes shape (finished sequences go on decoding, masked out), so on CUDA
# the decode step runs as a CUDA graph (torch.compile "reduce-overhead"). On CPU it runs eagerly; the tests hold
# it to sample(), token for token, on left-padded prompts whose completions stop at different steps.


@torch.no_grad()
def sample_static(lm, prompts, num_generations, max_new_tokens, temperature, stop_ids, pad_id, top_k=0, top_p=1.0):
    """sample() with a static KV cache and a fixed-shape decode step (--sampler static)."""
    from transformers import StaticCache

    device = next(lm.parameters()).device
    rows = [p for p in prompts for _ in range(num_generations)]  # a prompt's G samples adjacent
    n, width = len(rows), -(-max(map(len, prompts)) // 64) * 64  # padded to a multiple of 64: few shapes to compile
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in rows], device=device)
    # one mask over the whole cache: the prompt's tokens now, each new token as it is written
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) + [0] * max_new_tokens for p in rows], device=device)
    pos = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    cache = StaticCache(config=lm.config, max_cache_len=width + max_new_tokens)
    where = torch.arange(width, device=device)  # the cache positions written by this call
    out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, cache_position=where,
             logits_to_keep=1)  # fmt: skip
    logits, pos, where = out.logits[:, -1].float(), pos[:, -1:], where[-1:]
    if not torch.isfinite(logits).all():
        die("the model's logits hold NaN/inf: its weights are broken (a diverged run?); lower --learning_rate")
    if device.type == "cuda" and not hasattr(lm, "compiled_forward"):  # compiled once per model, then replayed
        lm.compiled_forward = torch.compile(lm.forward, mode="reduce-overhead")
    forward = lm.compiled_forward if device.type == "cuda" else lm
    stop, alive = torch.tensor(stop_ids, device=device), torch.ones(n, dtype=torch.bool, device=device)
    certainty_sum, entropy_sum, length = (torch.zeros(n, device=device) for _ in range(3))
    tokens = torch.full((n, max_new_tokens), pad_id, device=device)
    for t in range(max_new_tokens):
        certainty_sum += torch.where(alive, self_certainty(logits), 0.0)  # finished rows add nothing
        entropy_sum += torch.where(alive, entropy(logits), 0.0)
        next_token = torch.where(alive, choose_tokens(logits, temperature, top_k, top_p), pad_id)
        tokens[:, t], length = next_token, length + alive
        alive &= ~torch.isin(next_token, stop)
        if t == max_new_tokens - 1 or (t % 16 == 15 and not alive.any()):  # the host waits every 16 steps only
            break
        mask[:, width + t] = 1
        pos, where = pos + 1, where + 1
        step = dict(input_ids=next_token[:, None], attention_mask=mask, position_ids=pos, cache_position=where)
        logits = forward(**step, past_key_values=cache).logits[:, -1].float()
    return to_rollouts(prompts, num_generations, tokens, length, certainty_sum, entropy_sum, alive)


def parse_args(argv=None):
    return common.parse_flags(Args, argv, epilog=f"training curves: {common.PLOT_USAGE}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["plot"]:  # python intuitor.py plot RUN/metrics.jsonl [OUT.png]
        common.plot_metrics(*sys.argv[2:])
    else:
        train(parse_args(sys.argv[1:]))
