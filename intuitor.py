"""
INTUITOR in one file: GRPO whose only reward is the model's own self-certainty
("Learning to Reason without External Rewards", Zhao et al., arXiv 2505.19590).

    1 GPU / CPU : python intuitor.py --model Qwen/Qwen2.5-1.5B
    8 GPUs      : torchrun --standalone --nproc_per_node=8 intuitor.py --model Qwen/Qwen2.5-1.5B
    7B and up   : torchrun ... intuitor.py --model Qwen/Qwen2.5-7B --parallel fsdp (sharded; docs/many_gpus.md)
    curves      : python intuitor.py plot runs/intuitor/metrics.jsonl

The algorithm, one rollout step (paper Sec. 3; the loop is GRPO's: Shao et al., DeepSeekMath, arXiv 2402.03300):
  1. sample G completions o_1..o_G per prompt q from the current policy (temperature tau, top-k, top-p);
  2. reward each by its self-certainty SC(o|q) = 1/|o| sum_i KL(U || p(.|q, o_<i)), read off the raw
     (temperature-1) logits the sampler computes anyway: no extra forward pass;
  3. group-normalise rewards into advantages A = (SC - mean_G) / (std_G + 1e-4);
  4. minimise the clipped surrogate + beta * KL(pi || pi_ref) (k3 estimator) over the completions' tokens,
     with num_iterations optimizer steps on the same rollouts (1 in the paper).

The file reads in that order, then the loop and its setup, then what only a GPU needs (a fixed-shape sampler,
bf16 copies). Each registry here (REWARDS, ADVANTAGES, REWARD_MIXINGS, KL_ESTIMATORS, IMPORTANCE_RATIOS,
LOSS_AGGREGATIONS) holds the paper's entries; ablations.py adds the wider literature's variations to the same
registries (docs/ablations.md), so this file holds no code of theirs. intuitor_harness/ holds what surrounds the method:
flag checks, ranks, model loading and the memory plan (process.py); the run directory, checkpoints and resume
(runs.py); every logged metric, the reward-hacking alarm and plots (watch.py); datasets, answer extraction and
grading (tasks.py), which the GRPO baselines and the accuracy monitor use; and the benchmarks and sandbox of eval.py.

Before you fork:
  - token i is scored at position i-1 (the official `logits[:, -C:]` is off by one);
  - on GPU the policy keeps fp32 master weights under bf16 autocast;
  - every step re-seeds from (seed, step, rank), so a resumed run samples what an uninterrupted one would;
  - a prompt's G completions share a rank, and the loss normaliser counts the tokens of all ranks.
"""

import copy
import inspect
import math
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from intuitor_harness import process, runs, tasks, watch
from intuitor_harness.process import die

SYSTEM_PROMPT = (
    "You are a helpful AI Assistant, designed to provided well-reasoned and detailed responses. You FIRST "
    "think about the reasoning process step by step and then provide the user with the answer. Please enclose "
    "your final answer in the box: \\boxed{Your Answer}. Please stop generation immediately after outputing "
    "the box."
)


# ----------------------------------------------------------------------------- arguments
def arg(default, help, group):  # a command-line flag: its default, its line in --help and its group there
    return field(default=default, metadata={"help": help, "group": group})


PAPER, SAMPLING, UPDATE, VARIATIONS, RUN, HARDWARE = (
    "the paper's method and data",
    "sampling (step 1)",
    "the update (steps 3-4)",
    "variations from the literature (ablations.py, docs/ablations.md)",
    "the run: output, checkpoints, logging",
    "memory, precision and several GPUs",
)


@dataclass
class Args:
    """Every flag, in --help's groups; the defaults are the paper's. A name in a registry is listed by --help."""

    # the paper's method and data
    model: str = arg("Qwen/Qwen2.5-1.5B", "hub id, local directory or local .gguf file", PAPER)
    dataset: str = arg("DigitalLearningGmbH/MATH-lighteval", "hub dataset or local .json/.jsonl/.parquet", PAPER)
    dataset_config: str = arg("", "configuration of a hub dataset (openai/gsm8k: main)", PAPER)
    dataset_split: str = arg("train", "split of a hub dataset", PAPER)
    prompt_column: str = arg("problem", "column holding the question", PAPER)
    answer_column: str = arg("", "gold answers (accuracy reward/monitor); default `answer`, else `solution`", PAPER)
    answer_format: Literal["auto", "boxed", "number"] = arg(
        "auto",
        "final answer: last \\boxed{}, or else the last number; auto = number if gold answers are '#### N'",
        PAPER,
    )
    system_prompt: str = arg(SYSTEM_PROMPT, "system message of the chat template ('' for none)", PAPER)
    prompt_format: Literal["chat", "plain"] = arg(
        "chat", "chat: the model's chat template; plain: 'SYSTEM\\n\\nQuestion: Q\\nAnswer:' as raw text, completions "
        "cut after 'Question:' (a base-like regime; render_prompt)", PAPER,
    )  # fmt: skip
    reward: str = arg("self_certainty", "a name in REWARDS, or a weighted mix 'self_certainty=1,accuracy=0.5'", PAPER)
    beta: float = arg(0.005, "weight of KL(pi || pi_ref); 0 skips the reference model", PAPER)
    learning_rate: float = arg(3e-6, "AdamW peak learning rate", PAPER)
    prompts_per_step: int = arg(128, "prompts per rollout step, summed over all ranks", PAPER)
    num_generations: int = arg(7, "G: completions sampled per prompt (group size)", PAPER)
    # sampling (step 1)
    generation_batch_size: int = arg(0, "sequences sampled at once per rank; 0 = all of the step", SAMPLING)
    max_prompt_length: int = arg(512, "longer prompts are skipped (and counted)", SAMPLING)
    max_completion_length: int = arg(3072, "new tokens per completion", SAMPLING)
    temperature: float = arg(0.9, "sampling temperature; log-probs use logits / temperature", SAMPLING)
    top_k: int = arg(0, "sample from the k most likely tokens; 0 = all (the official recipes: 50)", SAMPLING)
    top_p: float = arg(1.0, "nucleus sampling: the smallest set of tokens with this much probability", SAMPLING)
    sampler: Literal["eager", "static"] = arg(
        "eager", "static: fixed-shape KV cache, a CUDA graph per step on GPU", SAMPLING
    )
    sampling_weights: Literal["autocast", "bf16"] = arg(
        "autocast", "bf16 runs: autocast over fp32 weights, or a bf16 copy", SAMPLING
    )
    # the update (steps 3-4)
    epsilon: float = arg(0.2, "lower clip range of the token ratio: ratio >= 1 - epsilon", UPDATE)
    epsilon_high: float = arg(0.2, "upper clip range of the token ratio: ratio <= 1 + epsilon_high", UPDATE)
    num_iterations: int = arg(1, "mu: optimizer steps per batch of rollouts", UPDATE)
    micro_batch_size: int = arg(4, "sequences per forward/backward (gradient accumulation)", UPDATE)
    warmup_ratio: float = arg(0.1, "fraction of optimizer steps with linear warmup before the cosine decay", UPDATE)
    max_grad_norm: float = arg(1.0, "gradient-norm clipping", UPDATE)
    weight_decay: float = arg(0.0, "AdamW weight decay", UPDATE)
    max_steps: int = arg(-1, "rollout steps; -1 = --num_train_epochs epochs over the prompts", UPDATE)
    num_train_epochs: int = arg(1, "epochs over the prompts when --max_steps is -1", UPDATE)
    seed: int = arg(42, "seed for the data order and sampling", UPDATE)
    # variations from the literature (ablations.py fills the registries these flags name)
    certainty_model: Literal["policy", "reference"] = arg(
        "policy", "who scores the self_certainty reward: the policy being trained (online, the paper's) or the frozen "
        "initial model (offline, paper Fig. 7)", VARIATIONS,
    )  # fmt: skip
    reward_mixing: str = arg("separate", "how several rewards combine: a name in REWARD_MIXINGS", VARIATIONS)
    scale_rewards: str = arg("group", "what advantages are divided by: a name in ADVANTAGES", VARIATIONS)
    kl_estimator: str = arg("k3", "estimator of KL(pi || pi_ref): a name in KL_ESTIMATORS", VARIATIONS)
    importance_sampling_level: str = arg(
        "token", "the importance ratio: a name in IMPORTANCE_RATIOS (TRL's flag)", VARIATIONS
    )
    sequence_epsilon: float = arg(3e-4, "lower clip range of the sequence-level ratio (GSPO's)", VARIATIONS)
    sequence_epsilon_high: float = arg(4e-4, "upper clip range of the sequence-level ratio (GSPO's)", VARIATIONS)
    loss_type: str = arg("token", "how token losses are averaged: a name in LOSS_AGGREGATIONS", VARIATIONS)
    mask_truncated_completions: bool = arg(
        False, "completions cut by max_completion_length take no part in the loss (DAPO)", VARIATIONS
    )
    # the run: output, checkpoints, logging
    output_dir: str = arg("runs/intuitor", "metrics.jsonl and checkpoint-N/ go here", RUN)
    save_steps: int = arg(
        50, "checkpoint every N steps and at the end (see final_checkpoint); 0 = only at the end", RUN
    )
    final_checkpoint: bool = arg(
        True, "write a checkpoint at the end; --final_checkpoint false (or --no_final_checkpoint) skips it", RUN
    )
    resume: bool = arg(False, "continue the run in output_dir from its latest readable checkpoint", RUN)
    resume_from_checkpoint: str = arg("", "continue from this checkpoint-N folder (implies --resume)", RUN)
    run_name: str = arg("", "the run's name in the tracker (--report_to); default: output_dir's folder name", RUN)
    overwrite_output_dir: bool = arg(False, "replace the run already in output_dir", RUN)
    save_total_limit: int = arg(2, "keep the newest N checkpoints (the older one backs up a torn newest); 0 = all", RUN)
    log_completions_steps: int = arg(10, "print a sample completion every N steps; 0 = never", RUN)
    report_to: Literal["none", "tensorboard", "wandb"] = arg(
        "none", "also log to (metrics.jsonl is always written)", RUN
    )
    # memory, precision and several GPUs
    chunk_size: int = arg(1024, "tokens per chunk of the streamed lm_head", HARDWARE)
    vocab_chunk_size: int = arg(4096, "vocabulary slice of the streamed lm_head", HARDWARE)
    gradient_checkpointing: bool = arg(False, "recompute activations in backward", HARDWARE)
    dtype: Literal["auto", "float32", "bfloat16"] = arg("auto", "auto = bf16 autocast on CUDA, fp32 on CPU", HARDWARE)
    device: Literal["auto", "cpu", "cuda"] = arg("auto", "auto = cuda when available", HARDWARE)
    parallel: Literal["ddp", "fsdp"] = arg(
        "ddp",
        "several ranks: replicate the weights (DDP) or shard weights, gradients and AdamW state (FSDP2)",
        HARDWARE,
    )


# ----------------------------------------------------------------------------- 1. sampling
class Prompt(NamedTuple):
    ids: list  # prompt token ids, chat template applied
    gold: str | None  # gold answer: read by the GRPO reward and the accuracy monitor, never by INTUITOR


PLAIN_STOP = "Question:"  # --prompt_format plain: a completion ends where the model starts the next question


def render_prompt(tokenizer, question, system_prompt, prompt_format="chat"):
    """The prompt text the model sees: its chat template with the paper's system prompt.

    - A tokenizer without a chat template falls back to plain "System: ...\\n\\nUser: ...\\n\\nAssistant:" text.
    - prompt_format "plain" (a base-like regime for a chat-tuned model): no template, completion-style text,
      "SYSTEM\\n\\nQuestion: QUESTION\\nAnswer:"; its completions end at EOS or at PLAIN_STOP (cut_at_stop)."""
    if prompt_format == "plain":
        return (f"{system_prompt}\n\n" if system_prompt else "") + f"Question: {question}\nAnswer:"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"


def tokenize_prompt(tokenizer, question, system_prompt, prompt_format="chat"):
    return tokenizer(
        render_prompt(tokenizer, question, system_prompt, prompt_format), add_special_tokens=False
    ).input_ids


def make_prompts(questions, golds, tokenizer, system_prompt, max_prompt_length, prompt_format="chat"):
    """Tokenised prompts with their gold answers; those over max_prompt_length are skipped and counted (a
    question longer in characters than max_prompt_length of the longest token cannot fit: skipped untokenised)."""
    prompts, skipped = [], 0
    longest_token = max(map(len, tokenizer.get_vocab()))
    for question, gold in zip(questions, golds):
        if len(question) > max_prompt_length * longest_token:
            skipped += 1
            continue
        ids = tokenize_prompt(tokenizer, question, system_prompt, prompt_format)
        if len(ids) > max_prompt_length:
            skipped += 1
        else:
            prompts.append(Prompt(ids, gold))
    return prompts, skipped


def stop_token_ids(tokenizer, policy):
    """The tokens that end a completion: EOS of the tokenizer and generation config, and the chat template's
    end-of-turn token.

    A base model (Qwen2.5-1.5B) prompted with a chat template ends its turn with <|im_end|>, which is not its
    EOS; without it, every completion would run to max_completion_length."""
    ids = {tokenizer.eos_token_id}
    generation_eos = getattr(policy.generation_config, "eos_token_id", None)
    ids.update(generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos])
    if tokenizer.chat_template:
        turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "PROBE"}]
        tail = tokenizer.apply_chat_template(turn, tokenize=False).split("PROBE")[-1]
        after = tokenizer(tail, add_special_tokens=False).input_ids
        if after and tokenizer.convert_ids_to_tokens(after[0]) in tokenizer.added_tokens_encoder:
            ids.add(after[0])
    return sorted(i for i in ids if i is not None)


# Self-certainty (paper Sec. 3): how far each next-token distribution is from uniform, KL(U || p).
# - Its -log|V| term is the same constant for every token of every completion, so it cancels in the advantage
#   (r - mean_G), as any constant shared by a group does; it only makes a uniform distribution score 0.
# - KL(U || p) rather than entropy: entropy, log|V| - KL(p || U), is dominated by the tokens p makes likely,
#   while KL(U || p) = -log|V| - mean_j log p_j weighs every token of the vocabulary alike, so it rewards moving
#   mass off the implausible tail; the paper (Sec. 3, after Kang et al. 2025) argues that this makes it less
#   biased toward longer generations than entropy. Entropy is in ablations.py (neg_entropy), for comparison.
def certainty_from(lse, mean_logit, vocab_size):
    """Self-certainty from two statistics of the logits z: KL(U || softmax(z)) = logsumexp(z) - mean(z) - log|V|;
    zero for a uniform distribution, positive otherwise. The one definition: the sampler feeds it full logits,
    the streamed lm_head (step 4) its running logsumexp."""
    return lse - mean_logit - math.log(vocab_size)


def self_certainty(logits):
    """Self-certainty per position of logits (..., V), in float32 (float64 stays float64)."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return certainty_from(torch.logsumexp(z, -1), z.mean(-1), z.shape[-1])


def entropy(logits):
    """Token entropy H(p) = logsumexp(z) - sum_j p_j z_j (nats), logged beside self-certainty."""
    z = logits.float()
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


@dataclass
class Rollout:
    """One sampled completion and what the step learns about it; each field is filled by the stage named."""

    # sample(): the completion, and per token what the sampler read off the raw (temperature-1) logits of the
    # policy that sampled it (the token itself was drawn from logits / temperature after top-k and top-p)
    prompt: list  # prompt token ids (unpadded)
    completion: list  # sampled token ids, ending with a stop token unless truncated
    self_certainty: float  # SC(o|q), the mean of token_certainty: the INTUITOR reward
    entropy: float  # the mean of token_entropy
    truncated: bool  # cut off by max_completion_length
    # per generated token, CPU float32 tensors of len(completion)
    token_certainty: torch.Tensor | None = None  # self-certainty of each position's next-token distribution
    token_entropy: torch.Tensor | None = None  # entropy (nats) of the same distributions
    token_logp: torch.Tensor | None = None  # log p(o_i | q, o_<i) of each sampled token, at temperature 1
    # grade(): only when a reward or the accuracy monitor needs the final answer
    answer: str | None = None  # extracted final answer
    correct: bool = False  # answer equals the gold one
    answer_tokens: tuple | None = None  # [start, end) of the final answer in `completion` (when a reward asks)
    # reward_step(), --certainty_model reference only: SC(o|q) under the frozen initial model (paper Fig. 7)
    self_certainty_ref: float | None = None
    # the loop: group-normalised reward; a float, or a (len(completion),) tensor for token-level rewards
    advantage: float | torch.Tensor = 0.0


def sampling_logits(logits, temperature, top_k=0, top_p=1.0):
    """What the next token is drawn from: logits / temperature, then top-k, then nucleus (top-p) filtering.

    Rewards and entropy are read from the raw temperature-1 logits, as the official code does."""
    z = logits / temperature
    if top_k:
        z = z.masked_fill(z < z.topk(min(top_k, z.shape[-1])).values[:, -1:], -math.inf)
    if top_p < 1:
        z_sorted, order = z.sort(-1, descending=True)
        p = torch.softmax(z_sorted, -1)
        outside = p.cumsum(-1) - p > top_p  # tokens after the nucleus has reached top_p
        z = z.scatter(-1, order, z_sorted.masked_fill(outside, -math.inf))
    return z


def choose_tokens(logits, temperature, top_k=0, top_p=1.0):
    """Each row's next token: drawn from sampling_logits, or the most likely one at temperature 0."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(sampling_logits(logits, temperature, top_k, top_p), -1), 1).squeeze(1)


def positions(attention_mask):
    """Position ids counted from each row's first real token: left padding never shifts a prompt's positions."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(prompts, pad_id, width, device, free_columns=0):
    """Prompts right-aligned in `width` columns: token ids, the attention mask (with `free_columns` zeros after
    the prompt, for tokens still to come) and the prompt's position ids."""
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = [[0] * (width - len(p)) + [1] * len(p) + [0] * free_columns for p in prompts]
    mask = torch.tensor(mask, device=device)
    return ids, mask, positions(mask[:, :width])


class PerTokenValues:
    """What the sampler keeps of each decode step's logits, for n sequences of at most C tokens: per token,
    self-certainty, entropy and the sampled token's log-prob, all from the raw temperature-1 logits (the
    official code reads rewards there too; only the draw uses temperature, top-k and top-p). (n, C) floats,
    never logits; the per-sequence sums are accumulated alongside, one decode step at a time."""

    def __init__(self, n, max_new_tokens, device):
        self.token = {key: torch.zeros(n, max_new_tokens, device=device) for key in ("certainty", "entropy", "logp")}
        self.certainty, self.entropy, self.length = (torch.zeros(n, device=device) for _ in range(3))

    def add(self, t, logits, tokens, rows, alive=None):
        """Step t: the distributions `logits` of the sequences `rows` and the tokens drawn from them; a row that
        is not `alive` (the fixed-shape sampler keeps finished rows in the batch) adds nothing.

        A decode step holds one position per row, so its (rows, V) logits are small: self-certainty is read off
        them directly."""
        certainty, token_entropy = self_certainty(logits), entropy(logits)
        logp = torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None]).squeeze(1)
        if alive is not None:
            certainty, token_entropy, logp = (torch.where(alive, x, 0.0) for x in (certainty, token_entropy, logp))
        self.token["certainty"][rows, t] = certainty
        self.token["entropy"][rows, t] = token_entropy
        self.token["logp"][rows, t] = logp
        self.certainty[rows] += certainty
        self.entropy[rows] += token_entropy
        self.length[rows] += 1 if alive is None else alive

    def rollouts(self, prompts, num_generations, tokens, truncated):
        """One Rollout per sequence: its per-token values and their means."""
        token = {key: values.cpu() for key, values in self.token.items()}
        out = []
        for k, n_tokens in enumerate(self.length.long().tolist()):
            sc, ent = self.certainty[k].item() / n_tokens, self.entropy[k].item() / n_tokens
            completion, prompt = tokens[k, :n_tokens].tolist(), prompts[k // num_generations]
            per_token = {f"token_{key}": token[key][k, :n_tokens].clone() for key in ("certainty", "entropy", "logp")}
            out.append(Rollout(prompt, completion, sc, ent, bool(truncated[k]), **per_token))
        return out


def check_finite(logits):
    if not torch.isfinite(logits).all():
        die("the model's logits hold NaN/inf: its weights are broken (a diverged run?); lower --learning_rate")


@torch.no_grad()
def sample(policy, prompts, num_generations, max_new_tokens, temperature, stop_ids, pad_id, top_k=0, top_p=1.0):
    """Sample G completions per prompt with a KV cache, keeping each token's self-certainty on the way.

    - Each prompt is prefilled once (left-padded, logits of its last position only); its KV cache is then
      copied G times (batch_repeat_interleave), one row per sample.
    - The logits that pick token i are the ones that predict it, so SC(o|q) costs no extra pass.
    - Finished sequences leave the batch and the KV cache: no compute is spent on them.
    - temperature 0 = greedy. One Rollout per sequence, a prompt's G samples adjacent."""
    device = next(policy.parameters()).device
    cache_key = process.cache_argument(policy)  # the forward's name for the KV cache, which transformers renamed
    ids, mask, pos = left_pad(prompts, pad_id, max(map(len, prompts)), device)
    out = policy(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out[cache_key]
    cache.batch_repeat_interleave(num_generations)
    logits = out.logits[:, -1].float().repeat_interleave(num_generations, 0)
    check_finite(logits)
    mask = mask.repeat_interleave(num_generations, 0)
    pos = pos[:, -1:].repeat_interleave(num_generations, 0)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)

    n = logits.shape[0]
    rows = torch.arange(n, device=device)  # which sequence each row of the shrinking batch belongs to
    values, tokens = PerTokenValues(n, max_new_tokens, device), torch.full((n, max_new_tokens), pad_id, device=device)
    for t in range(max_new_tokens):
        next_token = choose_tokens(logits, temperature, top_k, top_p)
        values.add(t, logits, next_token, rows)
        tokens[rows, t] = next_token
        done = torch.isin(next_token, stop)
        if done.all() or t == max_new_tokens - 1:
            break
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, next_token, mask, pos = rows[keep], next_token[keep], mask[keep], pos[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos + 1
        inputs = {"input_ids": next_token[:, None], "attention_mask": mask, "position_ids": pos, cache_key: cache}
        logits = policy(**inputs, use_cache=True).logits[:, -1].float()

    truncated = torch.zeros(n, dtype=torch.bool, device=device)
    truncated[rows[~done]] = True  # still running at the last step: cut off by max_new_tokens
    return values.rollouts(prompts, num_generations, tokens, truncated)


def cut_at_stop(rollouts, tokenizer, stop):
    """Each completion whose text holds `stop` (PLAIN_STOP, the plain prompt format's end of an answer) is cut
    after the token that completes it, as if that token were a stop token: not truncated, and its per-token
    values and their means are those of the tokens kept. The text is decoded token by token
    (tasks.decoded_tokens), so that the stop string's offset maps back to a token."""
    for r in rollouts:
        text, ends = tasks.decoded_tokens(tokenizer, r.completion)
        at = text.find(stop)
        if at < 0:
            continue
        n = sum(end < at + len(stop) for end in ends) + 1  # tokens up to the one holding its last character
        r.completion, r.truncated = r.completion[:n], False
        r.token_certainty, r.token_entropy, r.token_logp = (x[:n] for x in (r.token_certainty, r.token_entropy,
                                                                            r.token_logp))  # fmt: skip
        r.self_certainty, r.entropy = r.token_certainty.mean().item(), r.token_entropy.mean().item()


# ----------------------------------------------------------------------------- 2. rewards
def grade(rollouts, golds, tokenizer, num_generations, answer_format="boxed", spans=False):
    """Extract each completion's final answer and compare it with its prompt's gold one (intuitor_harness/tasks.py);
    with `spans`, also locate the answer's tokens (tasks.answer_token_span)."""
    for k, r in enumerate(rollouts):
        r.answer = tasks.extract_answer(tokenizer.decode(r.completion, skip_special_tokens=True), answer_format)
        r.correct = tasks.is_correct(r.answer, golds[k // num_generations])
        if spans:
            r.answer_tokens = tasks.answer_token_span(tokenizer, r.completion, answer_format)


@dataclass(frozen=True)
class Reward:
    """A --reward value: its function, and what it needs from the step (each property a refusal or a stage).

    `fn(rollouts, num_generations, args)` returns one float per rollout, or with `advantages` set one tensor
    of len(completion) floats per rollout (a token-level reward). `args` holds every flag, so a reward with a
    hyperparameter reads it there (its flag declared in Args' variations group; docs/ablations.md)."""

    fn: Callable
    needs_gold: bool = False  # the dataset must have gold answers
    needs_answers: bool = False  # reads r.answer / r.correct: grade() runs first
    needs_answer_spans: bool = False  # reads r.answer_tokens
    reads_policy_certainty: bool = False  # reads the sampler's per-token self-certainty, which
    # --certainty_model reference does not replace: refused with it
    advantages: Callable | None = None  # (values, num_generations, args) -> per-token advantages, for a
    # token-level reward; None: ADVANTAGES[--scale_rewards] (one per rollout)


def online_self_certainty(rollouts, num_generations, args):
    """INTUITOR: the policy's own self-certainty SC(o|q), kept by the sampler."""
    return [r.self_certainty for r in rollouts]


def offline_self_certainty(rollouts, num_generations, args):
    """Self-certainty scored by the frozen initial model (paper Fig. 7; --certainty_model reference)."""
    return [r.self_certainty_ref for r in rollouts]


def accuracy(rollouts, num_generations, args):
    """GRPO: 1 when the final answer matches the gold one."""
    return [float(r.correct) for r in rollouts]


def plurality(rollouts, num_generations, args):
    """GRPO-PV: 1 when the final answer matches the plurality answer of its group (no gold needed)."""
    groups = [rollouts[i : i + num_generations] for i in range(0, len(rollouts), num_generations)]
    return [vote for group in groups for vote in tasks.plurality_votes([r.answer for r in group])]


# The paper's rewards: INTUITOR's and its baselines'. ablations.py adds the literature's.
REWARDS = {
    "self_certainty": Reward(online_self_certainty),
    "accuracy": Reward(accuracy, needs_gold=True, needs_answers=True),
    "plurality": Reward(plurality, needs_answers=True),
}


def parse_reward(spec):
    """'--reward a=1,b=0.5' -> {'a': 1.0, 'b': 0.5}; a bare name weighs 1; names must be in REWARDS, once each."""
    weights = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition("=")
        if name not in REWARDS:
            die(f"--reward: unknown reward {name!r}; choose from {', '.join(REWARDS)}")
        if name in weights:
            die(f"--reward: {name} is named twice; give each reward once, with its weight")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            die(f"--reward: weight {weight!r} of {name} is not a number")
        if not math.isfinite(weights[name]):
            die(f"--reward: weight {weight!r} of {name} must be a finite number")
    if not any(weights.values()):
        die(f"--reward {spec!r}: every weight is 0, so nothing would be trained; give one reward a weight")
    return weights


def compute_rewards(rollouts, reward_names, num_generations, args):
    """Each named reward of every rollout: a (B,) tensor, or for a token-level reward a list of B tensors (one
    value per completion token). With --certainty_model reference, self_certainty is the offline one."""
    rewards = {}
    for name in reward_names:
        offline = name == "self_certainty" and args.certainty_model == "reference"
        values = (offline_self_certainty if offline else REWARDS[name].fn)(rollouts, num_generations, args)
        token_level = len(values) > 0 and torch.is_tensor(values[0])
        rewards[name] = [v.float() for v in values] if token_level else torch.tensor(values, dtype=torch.float32)
    return rewards


def per_sequence(rewards):
    """Each reward as one value per rollout (a token-level reward: its mean over the completion), for logging."""
    return {name: v if torch.is_tensor(v) else torch.stack([x.mean() for x in v]) for name, v in rewards.items()}


# ----------------------------------------------------------------------------- 3. advantages
def zero_equal_groups(rewards, advantages):
    """A group whose rewards are all equal gets exactly A = 0 (float rounding of its mean is not allowed to push
    identical completions anywhere); rewards and advantages are (groups, G)."""
    equal = rewards.amax(1, keepdim=True) == rewards.amin(1, keepdim=True)
    return torch.where(equal, 0.0, advantages)


def group_advantages(rewards, num_generations, args=None, eps=1e-4):
    """GRPO's advantage (DeepSeekMath), the paper's: A_i = (r_i - mean(r_group)) / (std(r_group) + eps), the
    unbiased sample std of the group's G rewards (TRL's default too); equal rewards give A = 0, never NaN."""
    r = rewards.view(-1, num_generations)
    advantages = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    return zero_equal_groups(r, advantages).view(-1)


# --scale_rewards: how a sequence-level reward becomes advantages, (B,) rewards -> (B,) advantages.
ADVANTAGES = {"group": group_advantages}


def weighted_advantages(rewards, weights, num_generations, args):
    """Step 3 for --reward: A = sum_k w_k A_k, each reward's own advantages weighted (for the paper's single
    reward of weight 1, its group advantages). A weight keeps its meaning (0.5 = half the push; weight 0 logs
    a reward without training on it; -1 minimises it). One float per rollout, or per token when a reward is
    token-level (a rollout's sequence-level advantage then applies to each of its tokens)."""
    parts = []
    for name, w in weights.items():
        advantages = REWARDS[name].advantages or ADVANTAGES[args.scale_rewards]
        a = advantages(rewards[name], num_generations, args)
        parts.append((w, a.tolist() if torch.is_tensor(a) else a))
    return [sum(w * a[k] for w, a in parts) for k in range(len(parts[0][1]))]


# --reward_mixing: how several rewards make one advantage; "separate" (default) is weighted_advantages.
REWARD_MIXINGS = {"separate": weighted_advantages}


# ----------------------------------------------------------------------------- 4. the loss and the update
# The loss needs log pi(o_i | q, o_<i) of every completion token under the policy being trained (with gradient),
# under pi_old when rollouts are reused (num_iterations > 1), and under the frozen pi_ref for the KL.
def completion_logprobs(h, weight, targets, temperature):
    """The definition: log softmax(h W^T / T)[target], for hidden states h (N, H) (position i-1's scores token
    i), the lm_head weight W (V, H) and the target tokens (N,). Holds an (N x V) logits tensor: the streamed
    version below computes the same numbers without it, and is what runs."""
    return torch.log_softmax((h @ weight.T).float() / temperature, -1).gather(1, targets[:, None]).squeeze(1)


# Streamed: for a 3k-token completion and a 150k vocabulary, (N x V) would be 1.7 GB in fp32 per sequence.
# Below, the same log-probs one (token chunk x vocabulary slice) tile at a time, forward and backward, with
# one online-logsumexp rule: lse <- logaddexp(lse, logsumexp(tile)); a running sum of e^(z - lse) terms is
# rescaled by e^(old lse - new lse) whenever lse grows. Offline self-certainty (--certainty_model reference)
# reads its two statistics off the same tiles.
def _lm_head_tile_stats(h, weight, targets, temperature, vocab_chunk, mean_row=None):
    """One token chunk through the lm_head, one vocabulary slice at a time (a few numbers per token): the target
    log-prob at `temperature` and its logsumexp; given mean_row w̄ (the mean row of the lm_head weight), also
    self-certainty and entropy at temperature 1, from mean_j z_j = h . w̄ and sum_j p_j z_j."""
    n, V = h.shape[0], weight.shape[0]
    lse = torch.full((n,), -math.inf, device=h.device)  # logsumexp of z / T so far
    target = torch.zeros(n, device=h.device)
    # temperature 1: logsumexp of z so far, and the sums of e^(z_j - lse1) and of e^(z_j - lse1) z_j, whose
    # ratio is E_p[z] (a ratio, so lse1's rounding cancels); float64, as they are rescaled at every slice
    lse1 = torch.full((n,), -math.inf, device=h.device, dtype=torch.float64)
    p_1, p_z = (torch.zeros(n, device=h.device, dtype=torch.float64) for _ in range(2))
    for v0 in range(0, V, vocab_chunk):
        z = (h @ weight[v0 : v0 + vocab_chunk].T).float()
        z_t = z / temperature if temperature != 1 else z
        lse = torch.logaddexp(lse, torch.logsumexp(z_t, -1))
        in_this_slice = (targets >= v0) & (targets < v0 + z.shape[1])
        column = (targets - v0).clamp(0, z.shape[1] - 1)[:, None]
        target += torch.where(in_this_slice, z_t.gather(1, column).squeeze(1), 0.0)
        if mean_row is not None:
            new_lse1 = torch.logaddexp(lse1, torch.logsumexp(z, -1).double())
            e, rescale = torch.exp(z - new_lse1[:, None].float()), torch.exp(lse1 - new_lse1)
            p_1, p_z = p_1 * rescale + e.sum(-1).double(), p_z * rescale + (e * z).sum(-1).double()
            lse1 = new_lse1
    stats = {"logp": target - lse, "lse": lse}
    if mean_row is not None:
        stats["self_certainty"] = certainty_from(lse1.float(), h.float() @ mean_row, V)
        stats["entropy"] = (lse1 - p_z / p_1).float()
    return stats


@torch.no_grad()
def streamed_token_stats(h, weight, targets, temperature=1.0, chunk_size=1024, vocab_chunk=4096,
                         with_certainty=True):  # fmt: skip
    """completion_logprobs without gradient, streamed, and with_certainty also self-certainty and entropy at
    temperature 1 (the same certainty_from as the sampler's); memory O(chunk_size x vocab_chunk)."""
    mean_row = None
    if with_certainty:
        row_sum = sum(weight[v0 : v0 + vocab_chunk].float().sum(0) for v0 in range(0, weight.shape[0], vocab_chunk))
        mean_row = row_sum / weight.shape[0]
    chunks = zip(h.split(chunk_size), targets.split(chunk_size))
    per_chunk = [_lm_head_tile_stats(hc, weight, tc, temperature, vocab_chunk, mean_row) for hc, tc in chunks]
    keys = ("logp", "self_certainty", "entropy") if with_certainty else ("logp",)
    return {key: torch.cat([s[key] for s in per_chunk]) for key in keys}


class StreamedLogProbs(torch.autograd.Function):
    """completion_logprobs with gradient, streamed: a backward that recomputes each (token chunk x vocab slice)
    tile. d logp_i / d z_ij = (1[j = t_i] - p_ij) / T, accumulated tile by tile into grad_h and into a weight
    gradient; one tile of logits at most, in both directions.

    - Replicated weights (one process, DDP; `into_weight_grad`): the tiles go straight into the fp32 parameter's
      .grad and autograd gets a stride-0 zero, so for an untied head no second full-size weight gradient exists
      (DDP's hooks still fire through autograd). A head tied to the input embedding (Qwen2.5 up to 3B, SmolLM2)
      still gets the embedding's dense V x H gradient from autograd, which joins the streamed one in .grad.
    - Sharded weights (FSDP2): the weight is the unsharded copy FSDP lends the module for this pass, and its
      gradient must go back through autograd for FSDP to reduce-scatter it: one V x H fp32 tensor, returned."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk_size, vocab_chunk, into_weight_grad=True):
        chunks = zip(h.split(chunk_size), targets.split(chunk_size))
        per_chunk = [_lm_head_tile_stats(hc, weight, tc, temperature, vocab_chunk) for hc, tc in chunks]
        ctx.save_for_backward(h, weight, targets, torch.cat([s["lse"] for s in per_chunk]))
        ctx.head_settings, ctx.into_weight_grad = (temperature, chunk_size, vocab_chunk), into_weight_grad
        # backward recomputes the logits under the forward's autocast state, or p = exp(z - lse) drifts; under
        # bf16 autocast its gradient matmuls run in bf16 too, accumulated into fp32 grad_h and W.grad
        ctx.amp = h.device.type, torch.is_autocast_enabled(h.device.type), torch.get_autocast_dtype(h.device.type)
        return torch.cat([s["logp"] for s in per_chunk])

    @staticmethod
    def backward(ctx, grad):
        device_type, enabled, dtype = ctx.amp
        h, weight, targets, lse = ctx.saved_tensors
        temperature, chunk_size, vocab_chunk = ctx.head_settings
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        into_grad = ctx.into_weight_grad and weight.is_leaf and weight.requires_grad and weight.dtype == torch.float32
        if into_grad and weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        grad_w = weight.grad if into_grad else torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):  # recompute as the forward did
            for i in range(0, h.shape[0], chunk_size):
                hc, tc = h[i : i + chunk_size], targets[i : i + chunk_size]
                g = grad[i : i + chunk_size].float() / temperature
                for v0 in range(0, weight.shape[0], vocab_chunk):
                    w = weight[v0 : v0 + vocab_chunk]
                    dz = -torch.exp((hc @ w.T).float() / temperature - lse[i : i + chunk_size, None]) * g[:, None]
                    in_slice = (tc >= v0) & (tc < v0 + w.shape[0])
                    dz[in_slice, tc[in_slice] - v0] += g[in_slice]
                    grad_h[i : i + chunk_size] += dz @ w.float()
                    grad_w[v0 : v0 + vocab_chunk] += dz.T @ hc.float()
        grad_w = weight.new_zeros(()).expand(weight.shape) if into_grad else grad_w.to(weight.dtype)
        return grad_h.to(h.dtype), grad_w, None, None, None, None, None


class Batch(NamedTuple):
    """Rollouts as tensors: left-padded prompts followed by right-padded completions, so the
    prompt/completion boundary is one column, n_prompt, for the whole batch."""

    ids: torch.Tensor  # (B, n_prompt + C) token ids
    attention_mask: torch.Tensor  # (B, n_prompt + C) 1 on real tokens
    n_prompt: int  # width of the prompt block
    completion_mask: torch.Tensor  # (B, C) bool, True on completion tokens


def collate(rollouts, pad_id, device):
    width = max(len(r.prompt) for r in rollouts)
    length = max(len(r.completion) for r in rollouts)
    ids, attention, completion = [], [], []
    for r in rollouts:
        left, right = width - len(r.prompt), length - len(r.completion)
        ids.append([pad_id] * left + r.prompt + r.completion + [pad_id] * right)
        attention.append([0] * left + [1] * (len(r.prompt) + len(r.completion)) + [0] * right)
        completion.append([1] * len(r.completion) + [0] * right)
    ids, attention, completion = (torch.tensor(x, device=device) for x in (ids, attention, completion))
    return Batch(ids, attention, width, completion.bool())


def micro_batches(rollouts, size, pad_id, device):
    """(rollouts, Batch) pairs of at most `size` sequences."""
    chunks = [rollouts[i : i + size] for i in range(0, len(rollouts), size)]
    return [(chunk, collate(chunk, pad_id, device)) for chunk in chunks]


class CompletionLogProbs(torch.nn.Module):
    """A causal LM whose forward(*Batch) returns, per completion token (B, C), a dict: `logp`, its log-prob at
    `temperature` (completion_logprobs, streamed; with gradient when grad is enabled), and with with_certainty
    (no grad) also `self_certainty` and `entropy` at temperature 1.

    The hidden state at position i-1 predicts token i, so completion token i (column n_prompt + i) is scored
    from column n_prompt + i - 1. DDP wraps this module and FSDP2 shards it (its own parameters, the
    embedding, final norm and lm_head, form the root unit), so their hooks see the streamed head."""

    def __init__(self, lm, temperature, chunk_size, vocab_chunk, sharded=False):
        super().__init__()
        self.lm, self.temperature, self.sharded = lm, temperature, sharded
        self.chunk_size, self.vocab_chunk = chunk_size, vocab_chunk

    def forward(self, ids, attention_mask, n_prompt, completion_mask, with_certainty=False):
        pos = positions(attention_mask)
        out = self.lm.base_model(input_ids=ids, attention_mask=attention_mask, position_ids=pos, use_cache=False)
        h = out.last_hidden_state[:, n_prompt - 1 : -1][completion_mask]
        targets = ids[:, n_prompt:][completion_mask]
        weight = self.lm.get_output_embeddings().weight
        head_settings = (self.temperature, self.chunk_size, self.vocab_chunk)

        def scatter(values):  # (tokens,) -> (B, C), zeros on padding
            zeros = torch.zeros(completion_mask.shape, device=values.device)
            return zeros.masked_scatter(completion_mask, values.float())

        if torch.is_grad_enabled():
            return {"logp": scatter(StreamedLogProbs.apply(h, weight, targets, *head_settings, not self.sharded))}
        stats = streamed_token_stats(h, weight, targets, *head_settings, with_certainty=with_certainty)
        return {key: scatter(v) for key, v in stats.items()}


# KL(pi || pi_ref) per token from samples of pi, r = log pi_ref - log pi (Schulman, "Approximating KL
# Divergence", 2020, joschu.net/blog/kl-approx.html).
def kl_k3(logp, ref_logp):
    """k3 = exp(r) - r - 1: unbiased, >= 0, zero gradient where pi = pi_ref (the paper's, GRPO's and TRL's)."""
    return torch.exp(ref_logp - logp) - (ref_logp - logp) - 1


KL_ESTIMATORS = {"k3": kl_k3}  # --kl_estimator: (logp, ref_logp) -> per-token KL


def token_ratio(logp, old_logp, completion_mask, args):
    """The paper's importance ratio, per token: rho_t = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t), and its clip
    range [1 - epsilon, 1 + epsilon_high]."""
    return torch.exp(logp - old_logp), args.epsilon, args.epsilon_high


# --importance_sampling_level: (logp, old_logp, completion_mask, args) -> (ratio, epsilon, epsilon_high), the
# ratio (B, C), or (B, 1) for one ratio per sequence.
IMPORTANCE_RATIOS = {"token": token_ratio}


def per_token_loss(ratio, advantages, kl, beta, epsilon, epsilon_high):
    """The GRPO objective the paper minimises, per token (the PPO clipped surrogate with a KL penalty):

        -[min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) - beta KL],

    for ratios rho (B, C) or (B, 1), advantages (B,) (one per sequence) or (B, C) (one per token) and the KL
    (B, C). Returns the loss and where clipping binds (zero gradient there), both (B, C)."""
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon_high) * adv)
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    loss = -(surrogate - beta * kl)
    return loss, clipped.expand(loss.shape)


class Normalisers(NamedTuple):
    """The step's totals over all ranks and micro-batches: dividing by them makes the summed gradient
    independent of how the step is split."""

    tokens: int  # completion tokens in the loss
    sequences: int  # completions in the loss
    max_completion_length: int  # --max_completion_length (Dr. GRPO's constant)


def token_mean(loss, mask, n):
    """`token`: sum over the tokens / all tokens of the step (DAPO's token-level average: Yu et al., "DAPO: An
    Open-Source LLM Reinforcement Learning System at Scale", arXiv 2503.14476; TRL's `dapo`)."""
    return loss.sum() / n.tokens


def sequence_mean(loss, mask, n):
    """`grpo`: each sequence's mean over its tokens, summed / all sequences of the step (GRPO's original)."""
    return (loss.sum(1) / mask.sum(1).clamp(min=1)).sum() / n.sequences


# --loss_type: (masked per-token loss, mask, Normalisers) -> this micro-batch's share of the step's loss
LOSS_AGGREGATIONS = {"token": token_mean, "grpo": sequence_mean}
TRL_LOSS_NAMES = {"dapo": "token"}  # TRL's name for the same aggregation, accepted by --loss_type


def aggregate_loss(loss, completion_mask, loss_type, total_tokens, total_sequences, max_completion_length=1):
    """This micro-batch's share of the step's loss: LOSS_AGGREGATIONS[loss_type] of the masked per-token loss."""
    n = Normalisers(total_tokens, total_sequences, max_completion_length)
    return LOSS_AGGREGATIONS[loss_type](loss * completion_mask, completion_mask, n)


def global_sum(x):
    """x summed over all ranks (the loss normalisers count every rank's tokens); x itself in one process."""
    return process.all_reduce(x)


def make_optimizer(policy, args, total_steps, state=None):
    """AdamW with linear warmup then cosine decay over total_steps optimizer steps; resumed from `state` (whose
    optimizer state is full and keyed by parameter name, so it loads into replicated or sharded weights)."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(args.warmup_ratio * total_steps), total_steps)
    if state is not None:
        process.load_full_optimizer_state(policy, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return optimizer, scheduler


def batch_advantages(chunk, device):
    """A micro-batch's advantages: (b,) when each rollout has one, else (b, C), zero-padded past each completion."""
    values = [r.advantage for r in chunk]
    if not any(torch.is_tensor(a) for a in values):
        return torch.tensor(values, device=device)
    length = max(len(r.completion) for r in chunk)
    rows = [a if torch.is_tensor(a) else torch.full((len(r.completion),), a) for a, r in zip(values, chunk)]
    return torch.stack([torch.nn.functional.pad(a.float(), (0, length - len(a))) for a in rows]).to(device)


def optimize(policy_scorer, ref_scorer, optimizer, scheduler, rollouts, pad_id, args, autocast=nullcontext):
    """Minimise the loss over one batch of rollouts (advantages set): num_iterations optimizer steps, each
    accumulating gradients over micro-batches of args.micro_batch_size.

    - `policy_scorer` is the policy as a CompletionLogProbs, possibly DDP-wrapped or FSDP2-sharded;
      `ref_scorer` the frozen initial model's (None when beta is 0): one pass before the first update gives
      pi_ref's log-probs for the KL;
    - an optimizer step whose gradient norm is not finite is skipped (and counted).
    Returns the step's metrics, each averaged over the num_iterations passes (skipped_updates: counted)."""
    scorer = getattr(policy_scorer, "module", policy_scorer)  # the unwrapped module, for no-grad passes
    device = next(scorer.parameters()).device
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    batches = micro_batches(rollouts, args.micro_batch_size, pad_id, device)
    advantages = [batch_advantages(chunk, device) for chunk, _ in batches]
    in_loss = [torch.tensor([not (args.mask_truncated_completions and r.truncated) for r in chunk], device=device)
               for chunk, _ in batches]  # fmt: skip
    kept = [r for r in rollouts if not (args.mask_truncated_completions and r.truncated)]
    total_tokens = max(global_sum(sum(len(r.completion) for r in kept)).item(), 1)
    total_sequences = max(global_sum(len(kept)).item(), 1)

    # log pi_ref for the KL; and when rollouts are reused (mu > 1), log pi_old, frozen before the first update
    # (with mu = 1, pi_old = pi exactly: rho = exp(logp - logp.detach()) = 1 with the right gradient)
    with torch.no_grad(), autocast():
        ref_logps = [ref_scorer(*batch)["logp"] if args.beta else None for _, batch in batches]
        old_logps = [scorer(*batch)["logp"] if args.num_iterations > 1 else None for _, batch in batches]

    metrics = dict(loss=0.0, kl=0.0, clip_frac=0.0, grad_norm=0.0, skipped_updates=0)
    for _ in range(args.num_iterations):
        for j, (_, batch) in enumerate(batches):
            with reduce_gradients(policy_scorer, j == len(batches) - 1), autocast():
                logp = policy_scorer(*batch)["logp"]
                old_logp = old_logps[j] if old_logps[j] is not None else logp.detach()
                mask = batch.completion_mask & in_loss[j][:, None]
                ratio, epsilon, epsilon_high = IMPORTANCE_RATIOS[args.importance_sampling_level](
                    logp, old_logp, mask, args
                )
                kl = KL_ESTIMATORS[args.kl_estimator](logp, ref_logps[j]) if args.beta else torch.zeros_like(logp)
                losses, clipped = per_token_loss(ratio, advantages[j], kl, args.beta, epsilon, epsilon_high)
                loss = aggregate_loss(losses, mask, args.loss_type, total_tokens, total_sequences,
                                      args.max_completion_length)  # fmt: skip
                # DDP averages gradients over ranks; the normaliser is already global, so undo the average.
                (loss * world_size).backward()
            metrics["loss"] += loss.item() / args.num_iterations
            metrics["kl"] += (kl * mask).sum().item() / total_tokens / args.num_iterations
            metrics["clip_frac"] += (clipped & mask).sum().item() / total_tokens / args.num_iterations
        grad_norm = torch.nn.utils.clip_grad_norm_(scorer.parameters(), args.max_grad_norm).item()
        metrics["grad_norm"] += grad_norm / args.num_iterations
        if math.isfinite(grad_norm):  # the same on every rank: gradients are already all-reduced
            optimizer.step()
        else:  # a NaN/inf loss or gradient never reaches the weights
            metrics["skipped_updates"] += 1
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    for key in ("loss", "kl", "clip_frac"):
        metrics[key] = global_sum(metrics[key]).item()
    return metrics


def reduce_gradients(policy_scorer, last):
    """Gradients are reduced across ranks once per optimizer step, on its last micro-batch; before it, each rank
    accumulates its own. DDP: no_sync(); FSDP2: set_requires_gradient_sync. A context for the micro-batch."""
    if hasattr(policy_scorer, "no_sync"):
        return nullcontext() if last else policy_scorer.no_sync()
    if hasattr(policy_scorer, "set_requires_gradient_sync"):
        policy_scorer.set_requires_gradient_sync(last)
    return nullcontext()


# ----------------------------------------------------------------------------- the loop
def step_prompts(prompts, step, prompts_per_step, rank, world_size, seed):
    """This rank's prompts of a step: a seeded shuffle per epoch that every rank agrees on, cut into
    consecutive blocks, so no prompt repeats within an epoch and ranks never overlap (a prompt's G samples
    are drawn on one rank, so its group never straddles ranks)."""
    epoch, i = divmod(step, len(prompts) // prompts_per_step)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = prompts_per_step // world_size
    start = i * prompts_per_step + rank * per_rank
    return [prompts[j] for j in order[start : start + per_rank]]


def seed_step(seed, step, rank):
    """Every (step, rank) gets its own stream: a resumed run samples what an uninterrupted one would. The rank
    is part of the seed, so ranks sample differently: a run on 8 GPUs draws other rollouts than on 1."""
    s = (seed * 1_000_003 + step * 1009 + rank) % 2**63
    random.seed(s)
    torch.manual_seed(s)


@dataclass(kw_only=True)
class Run:
    """What the loop needs, built once by setup() (below the loop). One set of trained weights has three handles:
    `policy` (the transformers model: sampled from, put in train/eval mode, saved), `policy_scorer` (the same
    weights behind a CompletionLogProbs, the module DDP wraps or FSDP2 shards, which the update differentiates)
    and `sampling_policy` (`policy` itself, or a bf16 copy refreshed after every update on GPU)."""

    args: "Args"
    runtime: process.Runtime  # rank, world size, device, autocast
    policy: torch.nn.Module  # the transformers causal LM being trained
    sampling_policy: torch.nn.Module  # what step 1 samples from: policy, or its bf16 copy (--sampling_weights bf16)
    policy_scorer: torch.nn.Module  # policy's weights as a CompletionLogProbs; DDP-wrapped or FSDP2-sharded
    ref_scorer: torch.nn.Module | None  # the frozen initial model as a CompletionLogProbs (KL, offline SC)
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    prompts: list  # every Prompt of the dataset
    stop_ids: list  # token ids that end a completion
    reward_weights: dict  # reward name -> weight (--reward)
    answer_format: str  # how final answers are read: "boxed" or "number"
    grade_answers: bool  # a reward or the accuracy monitor needs the final answers
    start_step: int
    max_steps: int  # rollout steps (each num_iterations optimizer steps)
    run_dir: runs.RunDirectory
    watcher: watch.Watcher
    inputs: dict  # fingerprints of the model and dataset files (runs.input_fingerprints)
    skipped_in_a_row: int = 0  # optimizer steps skipped for a non-finite gradient, in a row


def sample_step(run, prompts):
    """1. G completions per prompt from the current policy, generation_batch_size sequences at a time."""
    args, pad_id = run.args, run.tokenizer.pad_token_id
    sampler = sample_static if args.sampler == "static" else sample  # the same Rollouts either way
    prompts_per_call = args.generation_batch_size // args.num_generations or len(prompts)
    rollouts = []
    run.policy.eval()
    # FSDP2 without a sampling copy: full weights for the phase, so that ranks decode independently
    with process.unsharded(run.policy_scorer) if run.sampling_policy is run.policy else nullcontext():
        for i in range(0, len(prompts), prompts_per_call):
            ids = [p.ids for p in prompts[i : i + prompts_per_call]]
            with run.runtime.autocast():
                rollouts += sampler(run.sampling_policy, ids, args.num_generations, args.max_completion_length,
                                    args.temperature, run.stop_ids, pad_id, args.top_k, args.top_p)  # fmt: skip
    if args.prompt_format == "plain":  # no chat template to end the turn: an answer also ends at PLAIN_STOP
        cut_at_stop(rollouts, run.tokenizer, PLAIN_STOP)
    return rollouts


@torch.no_grad()
def reference_certainty(ref_scorer, rollouts, micro_batch_size, pad_id, autocast=nullcontext):
    """--certainty_model reference: each rollout's SC(o|q) under the frozen initial model (paper Fig. 7), from
    one streamed pass (the sampler's values are the policy's); stored as self_certainty_ref."""
    device = next(ref_scorer.parameters()).device
    for chunk, batch in micro_batches(rollouts, micro_batch_size, pad_id, device):
        with autocast():
            stats = ref_scorer(*batch, with_certainty=True)
        for k, r in enumerate(chunk):
            r.self_certainty_ref = stats["self_certainty"][k, : len(r.completion)].mean().item()


def reward_step(run, rollouts, prompts):
    """2. Every reward of --reward. Final answers are graded only when a reward or the accuracy monitor needs
    them (the answer spans only when a reward reads them)."""
    args = run.args
    if run.grade_answers:
        spans = any(REWARDS[name].needs_answer_spans for name in run.reward_weights)
        grade(rollouts, [p.gold for p in prompts], run.tokenizer, args.num_generations, run.answer_format, spans)
    if args.certainty_model == "reference":
        reference_certainty(run.ref_scorer, rollouts, args.micro_batch_size, run.tokenizer.pad_token_id,
                            run.runtime.autocast)  # fmt: skip
    return compute_rewards(rollouts, run.reward_weights, args.num_generations, args)


def update_step(run, rollouts, step):
    """4. Minimise the loss on the step's rollouts, guarded: a non-finite gradient skips the optimizer step (three
    in a row stop the run), an update that makes a weight non-finite stops it before anything is saved."""
    run.policy.train()
    pad_id = run.tokenizer.pad_token_id
    update = optimize(run.policy_scorer, run.ref_scorer, run.optimizer, run.scheduler, rollouts, pad_id, run.args,
                      run.runtime.autocast)  # fmt: skip
    run.skipped_in_a_row = run.skipped_in_a_row + 1 if update["skipped_updates"] else 0
    if run.skipped_in_a_row >= 3:
        die(f"steps {step - 1}-{step + 1} had a non-finite loss or gradient; lower --learning_rate")
    if not process.all_finite(run.policy):  # a finite gradient, too large a step
        die(f"step {step + 1}: the update made weights NaN/inf; lower --learning_rate")
    if run.sampling_policy is not run.policy:  # --sampling_weights bf16 (what only a GPU needs, at the end)
        copy_weights(run.policy, run.sampling_policy)
    return update


def checkpoint_due(args, step, max_steps):
    """Whether step ends with a checkpoint: every --save_steps, and the last step unless --final_checkpoint false."""
    return bool(args.save_steps and step % args.save_steps == 0) or (step == max_steps and args.final_checkpoint)


def checkpoint_step(run, step):
    """Weights, tokenizer, optimizer and schedule, written by rank 0 when a checkpoint is due."""
    if not checkpoint_due(run.args, step, run.max_steps):
        return
    weights, optimizer = process.full_state_dicts(run.policy, run.optimizer)  # gathered on rank 0 (FSDP2 shards)
    if run.runtime.rank == 0:
        state = dict(step=step, optimizer=optimizer, scheduler=run.scheduler.state_dict(), args=asdict(run.args),
                     inputs=run.inputs)  # fmt: skip
        run.run_dir.save_checkpoint(run.policy, run.tokenizer, state, run.args.save_total_limit, weights)
    if run.runtime.world_size > 1:
        dist.barrier()


def train(args):
    """The training loop (GRPO's, with self-certainty as the reward): per rollout step, sample -> reward ->
    advantage -> update, then log and checkpoint."""
    run = setup(args)
    G, rank = args.num_generations, run.runtime.rank
    bar = dict(initial=run.start_step, total=run.max_steps, disable=not watch.progress_bars(rank), desc="steps")
    for step in tqdm(range(run.start_step, run.max_steps), **bar):
        seed_step(args.seed, step, rank)
        prompts = step_prompts(run.prompts, step, args.prompts_per_step, rank, run.runtime.world_size, args.seed)

        # 1. sample G completions per prompt; the sampler keeps each token's self-certainty
        t0 = time.time()
        rollouts = sample_step(run, prompts)
        t1 = time.time()

        # 2. rewards: self-certainty for INTUITOR (or the rewards of the baselines and ablations)
        rewards = reward_step(run, rollouts, prompts)
        t2 = time.time()

        # 3. group-normalised advantages (weighted_advantages; for one reward, its group_advantages)
        advantages = REWARD_MIXINGS[args.reward_mixing](rewards, run.reward_weights, G, args)
        for r, advantage in zip(rollouts, advantages):
            r.advantage = advantage

        # 4. policy update: minimise the clipped surrogate + beta KL
        lr = run.scheduler.get_last_lr()[0]
        update = update_step(run, rollouts, step)
        timings = {"sample_s": t1 - t0, "reward_s": t2 - t1, "update_s": time.time() - t2}

        run.watcher.record(step + 1, rollouts, per_sequence(rewards), update, lr, timings)
        checkpoint_step(run, step + 1)
    ends_on_checkpoint = checkpoint_due(args, run.max_steps, run.max_steps)
    run.watcher.done(run.run_dir.checkpoint_path(run.max_steps) if ends_on_checkpoint else None)
    process.leave_process_group(run.runtime)
    return run.policy


# ----------------------------------------------------------------------------- setup
def check_names(args, reward_weights):
    """Flag values that name a registry entry, and combinations that cannot run, read off the entries' own
    properties: one error line each, before any model loads. TRL's `dapo` becomes `token`."""
    args.loss_type = TRL_LOSS_NAMES.get(args.loss_type, args.loss_type)
    for flag, registry in flag_registries().items():
        if flag != "reward" and getattr(args, flag) not in registry:
            names = ", ".join(list(registry) + (list(TRL_LOSS_NAMES) if flag == "loss_type" else []))
            die(f"--{flag}: unknown name {getattr(args, flag)!r}; choose from {names}")
    token_level = sorted(name for name in reward_weights if REWARDS[name].advantages)
    if token_level and getattr(REWARD_MIXINGS[args.reward_mixing], "sequence_level_only", False):
        die(f"--reward_mixing {args.reward_mixing} mixes sequence-level rewards only; {', '.join(token_level)} is "
            "token-level: use --reward_mixing separate")  # fmt: skip
    policy_only = sorted(name for name in reward_weights if REWARDS[name].reads_policy_certainty)
    if policy_only and args.certainty_model == "reference":
        die(f"--certainty_model reference replaces the self_certainty reward only; {', '.join(policy_only)} "
            "reads the sampler's per-token values: use --certainty_model policy")  # fmt: skip


def flag_registries():
    """Each flag that names a registry entry, and its registry: --help lists their names (forks' too)."""
    return {
        "reward": REWARDS,
        "reward_mixing": REWARD_MIXINGS,
        "scale_rewards": ADVANTAGES,
        "kl_estimator": KL_ESTIMATORS,
        "importance_sampling_level": IMPORTANCE_RATIOS,
        "loss_type": LOSS_AGGREGATIONS,
    }


def setup(args):
    """Everything a run needs, built once and in the order it needs it: flags, run directory, data, then (the slow
    part) the models, optimizer and schedule, resumed from the newest readable checkpoint with --resume. Every
    check of the flags, the run directory and the data runs before any model loads; the memory plan, which
    needs the model's configuration and size, right after the policy loads, before anything else does."""
    watch.quiet_libraries()  # a log file holds one line per step
    runtime = process.runtime_from_env(args.device, args.dtype)
    process.check_train_args(args, runtime)
    reward_weights = parse_reward(args.reward)
    check_names(args, reward_weights)
    # first, so that a check failing on rank 0 alone stops every rank (process.on_first_rank)
    process.init_distributed(runtime, always=args.parallel == "fsdp")
    resume = args.resume or bool(args.resume_from_checkpoint)
    run_dir = runs.RunDirectory(args.output_dir, resume, args.overwrite_output_dir, rank=runtime.rank)
    checkpoint, state = run_dir.resume_point(asdict(args), args.resume_from_checkpoint)
    inputs = runs.input_fingerprints(args.model, args.dataset)  # a resumed run must see what it began with
    runs.check_same_inputs(state, inputs, checkpoint)
    hub_inputs = [("--model", args.model, "model"), ("--dataset", args.dataset, "dataset")]
    process.check_hub([(flag, name, kind) for flag, name, kind in hub_inputs if process.hub_id(name)])  # together
    need_gold = any(REWARDS[name].needs_gold for name in reward_weights)
    rows, questions, golds = tasks.load_questions(args.dataset, args.dataset_split, args.prompt_column,
                                                  args.answer_column, need_gold=need_gold,
                                                  config=args.dataset_config)  # fmt: skip
    tokenizer = process.load_tokenizer(checkpoint or args.model)  # prompts are checked before the weights load
    prompts, skipped = make_prompts(questions, golds, tokenizer, args.system_prompt, args.max_prompt_length,
                                    args.prompt_format)  # fmt: skip
    if len(prompts) < args.prompts_per_step:
        die(f"only {len(prompts)} prompts fit --max_prompt_length {args.max_prompt_length} ({skipped} are longer); "
            "raise --max_prompt_length or lower --prompts_per_step")  # fmt: skip
    steps_per_epoch = len(prompts) // args.prompts_per_step
    max_steps = args.max_steps if args.max_steps > 0 else args.num_train_epochs * steps_per_epoch

    model_device = torch.device("cpu") if args.parallel == "fsdp" else runtime.device  # FSDP2 moves shards there
    policy = process.load_model(checkpoint or args.model, model_device)[0]
    n_params = sum(p.numel() for p in policy.parameters())
    process.check_memory(process.memory_plan(policy.config, n_params, args, runtime.world_size, runtime.bf16), runtime)

    sharded = args.parallel == "fsdp"
    # log-probs at the sampling temperature; the streamed head's token chunk and vocabulary slice
    head_settings = (args.temperature, args.chunk_size, args.vocab_chunk_size)
    ref_scorer = None
    if args.beta > 0 or args.certainty_model == "reference":  # the initial model, also when resuming
        ref = process.load_model(args.model, model_device)[0] if checkpoint else copy.deepcopy(policy)
        # frozen; on GPU its matmul weights become bf16, computing what the policy computes (freeze, at the end)
        ref_scorer = CompletionLogProbs(freeze(ref, bf16_matmuls=runtime.bf16 and not sharded), *head_settings, sharded)
    sampling_policy = policy
    if args.sampling_weights == "bf16":  # a full bf16 copy on every rank, refreshed after every update
        sampling_policy = freeze(copy.deepcopy(policy), bf16_matmuls=True).to(runtime.device)
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy_scorer = CompletionLogProbs(policy, *head_settings, sharded)
    if sharded:  # FSDP2: weights, gradients and AdamW state sharded per decoder layer, on the GPU
        policy_scorer = process.shard(policy_scorer, runtime)
        ref_scorer = ref_scorer and process.shard(ref_scorer, runtime)
    elif runtime.world_size > 1:
        device_ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
        policy_scorer = torch.nn.parallel.DistributedDataParallel(
            policy_scorer, device_ids=device_ids, **process.ddp_buffer_arguments()
        )
    optimizer, scheduler = make_optimizer(policy, args, max_steps * args.num_iterations, state)

    start_step = state["step"] if state else 0
    run_dir.open(start_step)
    if runtime.rank == 0:
        resumed = f", resumed from {checkpoint}" if checkpoint else ""
        tqdm.write(f"{len(prompts)} prompts ({skipped} too long, skipped), {max_steps} steps, {runtime}{resumed}")
    has_gold = any(p.gold is not None for p in prompts)
    watcher = watch.Watcher(
        metrics_path=run_dir.metrics_path,
        max_steps=max_steps,
        rank=runtime.rank,
        report_to=args.report_to,
        output_dir=args.output_dir,
        config=asdict(args),
        tokenizer=tokenizer,
        log_completions_steps=args.log_completions_steps,
        has_gold=has_gold,
        num_generations=args.num_generations,
        run_name=args.run_name or os.path.basename(os.path.abspath(args.output_dir)),
    )
    return Run(
        args=args,
        runtime=runtime,
        policy=policy,
        sampling_policy=sampling_policy,
        policy_scorer=policy_scorer,
        ref_scorer=ref_scorer,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        prompts=prompts,
        stop_ids=stop_token_ids(tokenizer, policy),
        reward_weights=reward_weights,
        answer_format=tasks.infer_answer_format(rows, args.answer_column, args.answer_format),
        grade_answers=has_gold or any(REWARDS[name].needs_answers for name in reward_weights),
        start_step=start_step,
        max_steps=max_steps,
        run_dir=run_dir,
        watcher=watcher,
        inputs=inputs,
    )


# ----------------------------------------------------------------------------- what only a GPU needs
def freeze(model, bf16_matmuls):
    """`model` made a frozen scorer or sampler (the reference, the bf16 sampling copy), in place; with
    bf16_matmuls, its matrix multiplications hold bf16 weights and everything else stays fp32.

    - Under bf16 autocast that computes exactly what the fp32 policy computes: autocast rounds the policy's
      nn.Linear weights (and biases) to the same bf16 numbers, and the embedding, the norms and the RoPE
      frequencies are fp32 in both. So at step 0 the KL to the reference is 0, and rollouts sampled from the
      copy carry the self-certainty of the policy being trained.
    - A blanket .to(bf16) would round RoPE's inv_freq (phase errors of radians at position 3000) and run the
      norms and the residual stream in bf16: a different model.
    - An lm_head tied to the input embedding stays fp32 with it."""
    model.requires_grad_(False).eval()
    embedding = model.get_input_embeddings().weight
    for module in model.modules() if bf16_matmuls else []:
        if isinstance(module, torch.nn.Linear) and module.weight is not embedding:
            module.to(torch.bfloat16)
    return model


@torch.no_grad()
def copy_weights(source, target):
    """Copy every parameter of `source` into `target` (same architecture), casting to target's dtype: the bf16
    sampling copy after each update. A sharded (FSDP2) parameter is gathered one at a time: every rank calls
    this, and never holds more than one in full."""
    for dst, src in zip(target.parameters(), source.parameters(), strict=True):
        dst.copy_(src.full_tensor() if hasattr(src, "full_tensor") else src)


# A sampler for GPUs.
# On a GPU sample() is launch-bound: every decode step issues hundreds of small kernels from Python. Here the KV
# cache is preallocated and no tensor changes shape (finished sequences go on decoding, masked out), so on CUDA
# the decode step runs as a CUDA graph (torch.compile "reduce-overhead"). The cache lives on the model and is
# reset, not rebuilt, between calls of the same shape: CUDA graphs are recorded against its tensors' addresses,
# so a new cache per call would record (and keep) a new graph per call. On CPU it runs eagerly; the tests hold
# it to sample(), token for token, on left-padded prompts whose completions stop at different steps.
def static_cache(policy, batch_size, max_cache_len):
    """The model's StaticCache for this shape, emptied; a new one only when the shape (or dtype) changes."""
    from transformers import StaticCache

    device = policy.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else policy.dtype
    key = (batch_size, max_cache_len, dtype)
    cache = getattr(policy, "static_cache", None)
    if cache is not None and policy.static_cache_key == key:
        cache.reset()
        return cache
    policy.static_cache, policy.static_cache_key = StaticCache(config=policy.config, max_cache_len=max_cache_len), key
    return policy.static_cache


@torch.no_grad()
def sample_static(policy, prompts, num_generations, max_new_tokens, temperature, stop_ids, pad_id, top_k=0,
                  top_p=1.0):  # fmt: skip
    """sample() with a static KV cache and a fixed-shape decode step (--sampler static)."""
    device, cache_key = next(policy.parameters()).device, process.cache_argument(policy)
    rows = [p for p in prompts for _ in range(num_generations)]  # a prompt's G samples adjacent
    n, width = len(rows), -(-max(map(len, prompts)) // 64) * 64  # padded to a multiple of 64: few shapes to compile
    # one mask over the whole cache: the prompt's tokens now, each new token as it is written
    ids, mask, pos = left_pad(rows, pad_id, width, device, free_columns=max_new_tokens)
    cache = static_cache(policy, n, width + max_new_tokens)
    written = torch.arange(width, device=device)  # cache positions written by this forward (older transformers)
    extra = {"cache_position": written} if "cache_position" in inspect.signature(policy.forward).parameters else {}
    out = policy(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, **{cache_key: cache}, **extra)
    logits, pos, written = out.logits[:, -1].float(), pos[:, -1:], written[-1:]
    check_finite(logits)
    if device.type == "cuda" and not hasattr(policy, "compiled_forward"):  # compiled once per model, then replayed
        policy.compiled_forward = torch.compile(policy.forward, mode="reduce-overhead")
    forward = policy.compiled_forward if device.type == "cuda" else policy
    stop, alive = torch.tensor(stop_ids, device=device), torch.ones(n, dtype=torch.bool, device=device)
    values, tokens = PerTokenValues(n, max_new_tokens, device), torch.full((n, max_new_tokens), pad_id, device=device)
    for t in range(max_new_tokens):
        next_token = torch.where(alive, choose_tokens(logits, temperature, top_k, top_p), pad_id)
        values.add(t, logits, next_token, slice(None), alive)
        tokens[:, t] = next_token
        alive &= ~torch.isin(next_token, stop)
        if t == max_new_tokens - 1 or (t % 16 == 15 and not alive.any()):  # the host waits every 16 steps only
            break
        mask[:, width + t] = 1
        pos, written = pos + 1, written + 1
        extra = {"cache_position": written} if extra else {}
        step = {
            "input_ids": next_token[:, None],
            "attention_mask": mask,
            "position_ids": pos,
            cache_key: cache,
            **extra,
        }
        # .clone(): a graph replay's output lives in the graph's memory, overwritten by the next replay
        logits = forward(**step).logits[:, -1].float().clone()
    return values.rollouts(prompts, num_generations, tokens, truncated=alive)  # still alive after the last step


def parse_args(argv=None):
    return process.parse_flags(Args, argv, epilog=f"training curves: {watch.PLOT_USAGE}", registries=flag_registries())


def main(argv):
    if argv[:1] == ["plot"]:  # python intuitor.py plot RUN/metrics.jsonl [OUT.png]
        watch.plot_metrics(*argv[1:])
        return
    args = parse_args(argv)
    runs.interrupt_once()
    try:
        train(args)
    except KeyboardInterrupt:  # Ctrl-C: one line saying what was kept and how to continue
        runs.interrupted(args.output_dir)


if __name__ == "__main__":
    # ablations.py imports this file as the module `intuitor` and adds its entries to that module's registries,
    # so the run uses that module (this file, run as a script, is a second copy named __main__).
    import ablations  # noqa: F401

    sys.modules["intuitor"].main(sys.argv[1:])
