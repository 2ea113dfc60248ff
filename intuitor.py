"""
INTUITOR in one file: GRPO whose only reward is the model's own self-certainty
("Learning to Reason without External Rewards", Zhao et al., arXiv 2505.19590).

    1 GPU / CPU : python intuitor.py --model Qwen/Qwen2.5-1.5B
    8 GPUs      : torchrun --standalone --nproc_per_node=8 intuitor.py --model Qwen/Qwen2.5-1.5B
    curves      : python intuitor.py plot runs/intuitor/metrics.jsonl

The algorithm, one optimizer step (paper Sec. 3, Eq. 4-6):
  1. sample G completions o_1..o_G per prompt q from the current policy (temperature tau);
  2. reward each by its self-certainty SC(o|q) = 1/|o| sum_i KL(U || p(.|q, o_<i)), read off the logits
     the sampler computes anyway (no extra forward pass, temperature 1 = the raw distribution);
  3. group-normalise rewards into advantages A = (SC - mean_G) / (std_G + 1e-4);
  4. minimise the clipped surrogate + beta * KL(pi || pi_ref) with the k3 estimator.

Design choices worth knowing before you fork:
  - Token log-probs and self-certainty come from hidden states through a chunked, vocabulary-streamed
    lm_head (running max / sum-exp), forward *and* backward, so no (tokens x |V|) tensor ever exists.
  - The distribution that predicts completion token i is read at position i-1 (the official code's
    `logits[:, -C:]` is off by one).
  - On GPU the policy keeps fp32 master weights and runs under bf16 autocast: at lr 3e-6, updates to
    pure-bf16 weights are mostly rounded away. The frozen reference model is stored in bf16.
  - Randomness is re-seeded from (seed, step, rank) at every step, so a resumed run samples exactly what
    an uninterrupted one would, on any number of ranks, with no RNG state in the checkpoint.
  - DDP (torchrun) is detected from the environment; all G completions of a prompt live on one rank, so
    group statistics are local, and the loss normaliser (token count) is global.
"""
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

SYSTEM_PROMPT = (
    "You are a helpful AI Assistant, designed to provided well-reasoned and detailed responses. You FIRST "
    "think about the reasoning process step by step and then provide the user with the answer. Please enclose "
    "your final answer in the box: \\boxed{Your Answer}. Please stop generation immediately after outputing "
    "the box."
)


# ----------------------------------------------------------------------------- arguments
@dataclass
class Args:
    model: str = field(default="Qwen/Qwen2.5-1.5B", metadata={"help": "hub id, local directory or local .gguf file"})
    dataset: str = field(default="DigitalLearningGmbH/MATH-lighteval", metadata={"help": "hub dataset or local .json/.jsonl/.parquet"})
    dataset_split: str = field(default="train", metadata={"help": "split of a hub dataset"})
    prompt_column: str = field(default="problem", metadata={"help": "column holding the question"})
    system_prompt: str = field(default=SYSTEM_PROMPT, metadata={"help": "system message of the chat template ('' for none)"})
    num_generations: int = field(default=7, metadata={"help": "G: completions sampled per prompt (group size)"})
    prompts_per_step: int = field(default=128, metadata={"help": "prompts per optimizer step, summed over all ranks"})
    micro_batch_size: int = field(default=4, metadata={"help": "sequences per forward/backward (gradient accumulation)"})
    generation_batch_size: int = field(default=0, metadata={"help": "sequences sampled at once per rank; 0 = all of the step"})
    max_prompt_length: int = field(default=512, metadata={"help": "longer prompts are skipped (and counted)"})
    max_completion_length: int = field(default=3072, metadata={"help": "new tokens per completion"})
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature; log-probs use logits / temperature"})
    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW peak learning rate"})
    beta: float = field(default=0.005, metadata={"help": "weight of KL(pi || pi_ref); 0 skips the reference model"})
    epsilon: float = field(default=0.2, metadata={"help": "lower clip range: ratio >= 1 - epsilon"})
    epsilon_high: float = field(default=0.2, metadata={"help": "upper clip range: ratio <= 1 + epsilon_high"})
    num_iterations: int = field(default=1, metadata={"help": "mu: optimizer steps per batch of rollouts"})
    reward: str = field(default="self_certainty", metadata={"help": "self_certainty (INTUITOR) | accuracy (GRPO) | plurality (GRPO-PV) | neg_entropy, or a weighted mix 'self_certainty=1,accuracy=0.5'"})
    certainty_model: Literal["policy", "reference"] = field(default="policy", metadata={"help": "who scores self-certainty: the current policy (online) or the frozen initial model (offline, Fig. 7)"})
    answer_column: str = field(default="", metadata={"help": "gold answers for the accuracy reward/monitor; default: `answer` ('#### N' for GSM8K), else the last \\boxed{} of `solution`"})
    loss_type: Literal["token", "grpo"] = field(default="token", metadata={"help": "token: mean over all completion tokens of the step (TRL's 'dapo'); grpo: mean per sequence, then over sequences"})
    max_steps: int = field(default=-1, metadata={"help": "rollout steps; -1 = one epoch over the prompts"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of optimizer steps with linear warmup before the cosine decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clipping"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=42, metadata={"help": "seed for the data order and sampling"})
    output_dir: str = field(default="runs/intuitor", metadata={"help": "metrics.jsonl and checkpoint-N/ go here"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N steps (and at the end); 0 = only at the end"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in output_dir"})
    log_completions_steps: int = field(default=10, metadata={"help": "print a sample completion every N steps; 0 = never"})
    chunk_size: int = field(default=1024, metadata={"help": "tokens per chunk of the streamed lm_head"})
    vocab_chunk_size: int = field(default=4096, metadata={"help": "vocabulary slice of the streamed lm_head"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    dtype: Literal["auto", "float32", "bfloat16"] = field(default="auto", metadata={"help": "compute dtype; auto = bf16 autocast on CUDA, fp32 on CPU"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})


def die(msg):
    """Bad input ends here: one line naming the fix, exit status 1, no traceback (printed by rank 0 only)."""
    raise SystemExit(f"error: {msg}" if int(os.environ.get("RANK", 0)) == 0 else 1)


def check_args(a, world_size):
    if a.num_generations < 2:
        die("--num_generations must be >= 2: advantages are normalised within a group of completions")
    if a.prompts_per_step < 1 or a.prompts_per_step % world_size:
        die(f"--prompts_per_step ({a.prompts_per_step}) must be a positive multiple of the world size ({world_size})")
    if a.generation_batch_size % a.num_generations:
        die(f"--generation_batch_size ({a.generation_batch_size}) must be a multiple of --num_generations")
    for name in ("micro_batch_size", "chunk_size", "vocab_chunk_size", "max_completion_length", "num_iterations"):
        if getattr(a, name) < 1:
            die(f"--{name} must be >= 1")
    parse_reward(a.reward)
    if a.temperature <= 0:
        die("--temperature must be > 0 (GRPO needs distinct samples per group)")


# ----------------------------------------------------------------------------- model and data
def load_model(name, device):
    """Policy + tokenizer from a hub id, a local directory, or a local .gguf file (dequantised to fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs = {}
    if name.endswith(".gguf"):
        try:
            import accelerate, gguf  # noqa: F401  (transformers needs both to read GGUF)
        except ImportError:
            die("loading a .gguf model needs two optional packages: pip install gguf accelerate")
        kwargs, name = {"gguf_file": os.path.basename(name)}, os.path.dirname(os.path.abspath(name))
    elif not os.path.exists(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        die(f"--model {name!r}: no such file or directory; pass a hub id, a local model directory or a .gguf file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        die(f"cannot load --model {name!r} ({str(e).splitlines()[0]}); pass a hub id, a local model directory or a .gguf file")
    if getattr(lm.config, "quantization_config", None) is not None:
        # GGUF weights arrive dequantised but tagged as quantised, which save_pretrained refuses: rebuild plainly.
        del lm.config.quantization_config
        plain = AutoModelForCausalLM.from_config(lm.config, dtype=torch.float32)
        plain.load_state_dict(lm.state_dict())
        lm = plain
    head = lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None or getattr(lm.config, "final_logit_softcapping", None):
        die(f"{name}: the streamed lm_head assumes logits = h @ W.T (no bias, no soft-capping)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.to(device), tokenizer


def stop_token_ids(tokenizer, lm):
    """EOS ids of tokenizer and generation config, plus the chat template's end-of-turn token.

    A base model (Qwen2.5-1.5B) prompted with a chat template ends its turn with <|im_end|>, which is not
    its EOS; without this, every completion would run to max_completion_length."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(lm.generation_config, "eos_token_id", None)
    ids.update(gen if isinstance(gen, (list, tuple)) else [gen])
    if tokenizer.chat_template:
        probe = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "PROBE"}], tokenize=False)
        after = tokenizer(probe.split("PROBE")[-1], add_special_tokens=False).input_ids
        if after and tokenizer.convert_ids_to_tokens(after[0]) in tokenizer.added_tokens_encoder:
            ids.add(after[0])
    return sorted(i for i in ids if i is not None)


def render_prompt(tokenizer, question, system_prompt):
    """The prompt text the model sees: chat template with the paper's system prompt.

    A tokenizer without a chat template falls back to plain "System: ...\n\nUser: ...\n\nAssistant:" text."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"


def load_rows(path, split):
    """Rows of a hub dataset or a local .json/.jsonl/.parquet file, via datasets.load_dataset."""
    from datasets import load_dataset
    local = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(os.path.splitext(path)[1])
    try:
        if local:
            if not os.path.isfile(path):
                die(f"--dataset {path!r}: no such file")
            return load_dataset(local, data_files=path, split="train")
        return load_dataset(path, split=split)
    except (OSError, ValueError, ConnectionError) as e:
        die(f"cannot load --dataset {path!r} ({str(e).splitlines()[0]}); pass a hub dataset or a local .jsonl/.parquet file")


def load_prompts(args, tokenizer):
    """Tokenised prompts with their gold answer (or None); those over max_prompt_length are skipped and counted."""
    rows = load_rows(args.dataset, args.dataset_split)
    if args.prompt_column not in rows.column_names:
        die(f"--dataset has no column {args.prompt_column!r} (columns: {', '.join(rows.column_names)}); pass --prompt_column")
    prompts, skipped = [], 0
    from eval import gold_answers
    for question, gold in zip(rows[args.prompt_column], gold_answers(rows, args.answer_column)):
        ids = tokenizer(render_prompt(tokenizer, question, args.system_prompt), add_special_tokens=False).input_ids
        if len(ids) > args.max_prompt_length:
            skipped += 1
        else:
            prompts.append({"ids": ids, "gold": gold})
    return prompts, skipped


def step_prompts(prompts, step, prompts_per_step, rank, world_size, seed):
    """This rank's prompts of a step: a seeded shuffle per epoch that every rank agrees on, cut into
    consecutive blocks, so no prompt repeats within an epoch and ranks never overlap."""
    per_epoch = len(prompts) // prompts_per_step
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = prompts_per_step // world_size
    start = i * prompts_per_step + rank * per_rank
    return [prompts[j] for j in order[start:start + per_rank]]


# ----------------------------------------------------------------------------- sampling
def self_certainty(logits):
    """Self-certainty per position (paper Eq. 4): KL(U || softmax(z)) = logsumexp(z) - mean(z) - log|V|.

    Zero for a uniform distribution, positive otherwise; the last dimension is the vocabulary."""
    z = logits.float()
    return torch.logsumexp(z, -1) - z.mean(-1) - math.log(z.shape[-1])


def entropy(logits):
    """Token entropy H(p) = logsumexp(z) - sum_j p_j z_j (nats); its negative is the `neg_entropy` reward."""
    z = logits.float()
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


@torch.no_grad()
def sample(lm, prompts, num_generations, max_new_tokens, temperature, stop_ids, pad_id):
    """Sample G completions per prompt with a KV cache, accumulating self-certainty on the way.

    Each prompt is prefilled once (left-padded, position ids counted from its first real token) and its
    cache shared by its G samples. At every step the logits that pick token i are the ones that predict
    it, so SC(o|q) (Eq. 4) costs no extra pass. temperature == 0 means greedy decoding. Returns one dict
    per sequence: prompt ids, completion ids (ending with the stop token unless truncated), SC, mean
    token entropy, truncated."""
    device = next(lm.parameters()).device
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(num_generations)
    logits = out.logits[:, -1].float().repeat_interleave(num_generations, 0)
    mask = mask.repeat_interleave(num_generations, 0)
    pos = pos[:, -1:].repeat_interleave(num_generations, 0)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)

    n = logits.shape[0]
    rows = torch.arange(n, device=device)  # which sequence each row of the shrinking batch belongs to
    sc_sum, ent_sum, length = (torch.zeros(n, device=device) for _ in range(3))
    tokens = torch.full((n, max_new_tokens), pad_id, device=device)
    for t in range(max_new_tokens):
        sc_sum[rows] += self_certainty(logits)
        ent_sum[rows] += entropy(logits)
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        tokens[rows, t] = nxt
        length[rows] += 1
        done = torch.isin(nxt, stop)
        if done.all() or t == max_new_tokens - 1:
            break
        if done.any():  # finished sequences leave the batch (and the KV cache): no compute is spent on them
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, nxt, mask, pos = rows[keep], nxt[keep], mask[keep], pos[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos + 1
        out = lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()

    truncated = torch.zeros(n, dtype=torch.bool, device=device)
    truncated[rows[~done]] = True  # still running at the last step: cut off by max_new_tokens
    rollouts = []
    for k, (toks, m) in enumerate(zip(tokens.tolist(), length.long().tolist())):
        rollouts.append(dict(prompt=prompts[k // num_generations], completion=toks[:m], self_certainty=sc_sum[k].item() / m,
                             entropy=ent_sum[k].item() / m, truncated=bool(truncated[k])))
    return rollouts


# ----------------------------------------------------------------------------- streamed lm_head
def _lm_head_tile_stats(h, weight, targets, temperature, vocab_chunk, with_certainty):
    """One token chunk through the lm_head, streamed over vocabulary slices: an online logsumexp keeps
    a few numbers per token, so only a handful of (tokens x slice) tiles ever exist at once.

    Returns the target log-prob at `temperature`, its logsumexp, and (optionally) self-certainty and
    entropy of the raw (temperature 1) distribution."""
    n, V = h.shape[0], weight.shape[0]
    lse = torch.full((n,), -math.inf, device=h.device)  # logsumexp of z / T so far
    target = torch.zeros(n, device=h.device)
    m, s, w, zsum = lse.clone(), *torch.zeros(3, n, device=h.device)  # T = 1: max, sum e^(z-m), sum e^(z-m) z, sum z
    for v0 in range(0, V, vocab_chunk):
        z = (h @ weight[v0:v0 + vocab_chunk].T).float()
        zt = z / temperature if temperature != 1 else z
        lse = torch.logaddexp(lse, torch.logsumexp(zt, -1))
        hit = (targets >= v0) & (targets < v0 + z.shape[1])
        target += torch.where(hit, zt.gather(1, (targets - v0).clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0)
        if with_certainty:  # rescale the running sums whenever the max grows
            m_new = torch.maximum(m, z.max(-1).values)
            scale, e = torch.exp(m - m_new), torch.exp(z - m_new[:, None])
            s, m = s * scale + e.sum(-1), m_new
            w = w * scale + e.mul_(z).sum(-1)
            zsum += z.sum(-1)
    stats = {"logp": target - lse, "lse": lse}
    if with_certainty:
        lse1 = m + torch.log(s)
        stats["self_certainty"] = lse1 - zsum / V - math.log(V)
        stats["entropy"] = lse1 - w / s
    return stats


@torch.no_grad()
def streamed_token_stats(h, weight, targets, temperature=1.0, chunk_size=1024, vocab_chunk=4096):
    """Per-token log p(target) at `temperature`, self-certainty (Eq. 4) and entropy at temperature 1,
    from hidden states (N, H) and lm_head weight (V, H); memory O(chunk_size x vocab_chunk)."""
    parts = [_lm_head_tile_stats(h[i:i + chunk_size], weight, targets[i:i + chunk_size], temperature, vocab_chunk, True)
             for i in range(0, h.shape[0], chunk_size)]
    return {k: torch.cat([p[k] for p in parts]) for k in ("logp", "self_certainty", "entropy")}


class StreamedLogProbs(torch.autograd.Function):
    """log softmax(h W^T / T)[target] with a backward that recomputes each (token chunk x vocab slice) tile.

    d logp_i / d z_ij = (1[j = t_i] - p_ij) / T, accumulated straight into grad_h and grad_W, so neither
    pass holds more than one tile of logits (torch.utils.checkpoint cannot do this: each weight slice's
    backward would allocate a full-size weight gradient)."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk_size, vocab_chunk):
        parts = [_lm_head_tile_stats(h[i:i + chunk_size], weight, targets[i:i + chunk_size], temperature, vocab_chunk, False)
                 for i in range(0, h.shape[0], chunk_size)]
        ctx.save_for_backward(h, weight, targets, torch.cat([p["lse"] for p in parts]))
        ctx.conf = temperature, chunk_size, vocab_chunk
        # backward recomputes the logits: it must do so at the forward's precision, or p = exp(z - lse) drifts
        ctx.amp = h.device.type, torch.is_autocast_enabled(h.device.type), torch.get_autocast_dtype(h.device.type)
        return torch.cat([p["logp"] for p in parts])

    @staticmethod
    def backward(ctx, grad):
        device_type, enabled, dtype = ctx.amp
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return StreamedLogProbs._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        h, weight, targets, lse = ctx.saved_tensors
        temperature, chunk_size, vocab_chunk = ctx.conf
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk_size):
            hc, tc, g = h[i:i + chunk_size], targets[i:i + chunk_size], grad[i:i + chunk_size].float() / temperature
            for v0 in range(0, weight.shape[0], vocab_chunk):
                w = weight[v0:v0 + vocab_chunk]
                dz = -torch.exp((hc @ w.T).float() / temperature - lse[i:i + chunk_size, None]) * g[:, None]
                hit = (tc >= v0) & (tc < v0 + w.shape[0])
                dz[hit, tc[hit] - v0] += g[hit]
                grad_h[i:i + chunk_size] += dz @ w.float()
                grad_w[v0:v0 + vocab_chunk] += dz.T @ hc.float()
        return grad_h.to(h.dtype), grad_w.to(weight.dtype), None, None, None, None


def collate(rollouts, pad_id, device):
    """Left-padded prompts followed by right-padded completions, so the prompt/completion boundary is one
    column `n_prompt` for the whole batch. Returns ids, attention mask, n_prompt and the completion mask."""
    width = max(len(r["prompt"]) for r in rollouts)
    length = max(len(r["completion"]) for r in rollouts)
    ids, attn, cmask = [], [], []
    for r in rollouts:
        p, c = r["prompt"], r["completion"]
        ids.append([pad_id] * (width - len(p)) + p + c + [pad_id] * (length - len(c)))
        attn.append([0] * (width - len(p)) + [1] * (len(p) + len(c)) + [0] * (length - len(c)))
        cmask.append([1] * len(c) + [0] * (length - len(c)))
    t = lambda x: torch.tensor(x, device=device)  # noqa: E731
    return t(ids), t(attn), width, t(cmask).bool()


class CompletionLogProbs(torch.nn.Module):
    """Wraps a causal LM so that forward() returns completion-token statistics from hidden states.

    The hidden state at position i-1 predicts token i, so completion token i (column n_prompt + i) is
    scored from column n_prompt + i - 1. DDP wraps this module, so its gradient hooks see the streamed
    lm_head. With grad enabled it returns log-probs (B, C); without, a dict that adds SC and entropy."""

    def __init__(self, lm, temperature, chunk_size, vocab_chunk):
        super().__init__()
        self.lm, self.conf = lm, (temperature, chunk_size, vocab_chunk)

    def forward(self, ids, attn, n_prompt, cmask):
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        h = self.lm.base_model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
        h, targets = h[:, n_prompt - 1:-1][cmask], ids[:, n_prompt:][cmask]
        weight = self.lm.get_output_embeddings().weight
        scatter = lambda x: torch.zeros(cmask.shape, device=x.device).masked_scatter(cmask, x.float())  # noqa: E731
        if torch.is_grad_enabled():
            return scatter(StreamedLogProbs.apply(h, weight, targets, *self.conf))
        return {k: scatter(v) for k, v in streamed_token_stats(h, weight, targets, *self.conf).items()}


# ----------------------------------------------------------------------------- rewards
REWARDS = ("self_certainty", "accuracy", "plurality", "neg_entropy")


def compute_rewards(rollouts, names, num_generations, offline=False):
    """Per-sequence rewards by name. self_certainty: read off the sampler (online) or, if `offline`, the
    reference pass; neg_entropy: minus the mean token entropy; accuracy: the boxed answer matches the gold one;
    plurality: the boxed answer matches the group's plurality answer."""
    out = {}
    for name in names:
        if name == "self_certainty":
            out[name] = [r["self_certainty_ref" if offline else "self_certainty"] for r in rollouts]
        elif name == "neg_entropy":
            out[name] = [-r["entropy"] for r in rollouts]
        elif name == "accuracy":
            out[name] = [float(r["correct"]) for r in rollouts]
        else:
            from eval import plurality_votes
            out[name] = [v for i in range(0, len(rollouts), num_generations)
                         for v in plurality_votes([r["answer"] for r in rollouts[i:i + num_generations]])]
    return {k: torch.tensor(v) for k, v in out.items()}


def parse_reward(spec):
    """'--reward a=1,b=0.5' -> {'a': 1.0, 'b': 0.5}; a bare name weighs 1."""
    weights = {}
    for part in spec.split(","):
        name, _, w = part.strip().partition("=")
        if name not in REWARDS:
            die(f"--reward: unknown reward {name!r}; choose from {', '.join(REWARDS)}")
        try:
            weights[name] = float(w) if w else 1.0
        except ValueError:
            die(f"--reward: weight {w!r} of {name} is not a number")
    return weights


# ----------------------------------------------------------------------------- advantages and loss
def group_advantages(rewards, num_generations, eps=1e-4):
    """GRPO advantages (paper Eq. 3): A_i = (r_i - mean(r_group)) / (std(r_group) + eps).

    std is the unbiased sample std, as in TRL; a group of equal rewards gets A = 0, never NaN."""
    r = rewards.view(-1, num_generations)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


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
    a = advantages[:, None]
    surrogate = torch.min(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon_high) * a)
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1 if beta else torch.zeros_like(logp)
    clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
    return -(surrogate - beta * kl), kl, clipped


def aggregate_loss(loss, cmask, loss_type, total_tokens, total_sequences):
    """This micro-batch's share of the step's loss. `token`: sum over its tokens / all tokens of the
    step; `grpo`: sum of its per-sequence means / all sequences of the step. The totals are global
    (all ranks, all micro-batches), so the summed gradient does not depend on how the step is split."""
    loss = loss * cmask
    if loss_type == "token":
        return loss.sum() / total_tokens
    return (loss.sum(1) / cmask.sum(1).clamp(min=1)).sum() / total_sequences


# ----------------------------------------------------------------------------- training loop
def all_reduce(x, op=dist.ReduceOp.SUM):
    """Sum (or max) a float or tensor over ranks; identity in a single process."""
    t = torch.as_tensor(x, dtype=torch.float64, device="cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu")
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


@torch.no_grad()
def reference_pass(ref, rollouts, args, pad_id, autocast=nullcontext):
    """One forward of the frozen initial model over the rollouts: per-token log-probs for the KL term and,
    from the same streamed pass, offline self-certainty (paper Fig. 7). Stored on each rollout."""
    device = next(ref.parameters()).device
    for i in range(0, len(rollouts), args.micro_batch_size):
        mb = rollouts[i:i + args.micro_batch_size]
        batch = collate(mb, pad_id, device)
        with autocast():
            out = ref(*batch)
        for k, r in enumerate(mb):
            n = len(r["completion"])
            r["ref_logp"] = out["logp"][k, :n]
            r["self_certainty_ref"] = out["self_certainty"][k, :n].mean().item()


def optimize(model, optimizer, scheduler, rollouts, args, pad_id, autocast=nullcontext):
    """Minimise Eq. 5 over one batch of rollouts (each with an 'advantage', and 'ref_logp' when beta > 0):
    num_iterations optimizer steps, each accumulating gradients over micro-batches. `model` is a
    CompletionLogProbs, possibly DDP-wrapped. Returns the step's metrics."""
    scorer = getattr(model, "module", model)
    device = next(scorer.parameters()).device
    world = dist.get_world_size() if dist.is_initialized() else 1
    mbs = [rollouts[i:i + args.micro_batch_size] for i in range(0, len(rollouts), args.micro_batch_size)]
    batches = [collate(mb, pad_id, device) for mb in mbs]
    advantages = [torch.tensor([r["advantage"] for r in mb], device=device) for mb in mbs]
    total_tokens = all_reduce(sum(len(r["completion"]) for r in rollouts)).item()
    total_sequences = all_reduce(len(rollouts)).item()

    # When rollouts are reused (mu > 1), rho needs the sampling policy's log-probs, frozen before the first
    # update; with mu = 1, pi_old = pi exactly and rho = exp(logp - logp.detach()) = 1 with the right gradient.
    with torch.no_grad(), autocast():
        old_logps = [scorer(*b)["logp"] if args.num_iterations > 1 else None for b in batches]
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True).to(device)  # noqa: E731
    ref_logps = [pad([r["ref_logp"] for r in mb]) if args.beta else None for mb in mbs]

    m = dict(loss=0.0, kl=0.0, clip_frac=0.0, grad_norm=0.0)
    for it in range(args.num_iterations):
        for j, batch in enumerate(batches):
            last = j == len(batches) - 1
            sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync, autocast():
                logp = model(*batch)
                old = old_logps[j] if old_logps[j] is not None else logp.detach()
                ref_logp = ref_logps[j] if ref_logps[j] is not None else logp.detach()
                loss_tok, kl, clipped = per_token_loss(logp, old, ref_logp, advantages[j], args.beta, args.epsilon, args.epsilon_high)
                loss = aggregate_loss(loss_tok, batch[3], args.loss_type, total_tokens, total_sequences)
                # DDP averages gradients over ranks; the normaliser is already global, so undo the average.
                (loss * world).backward()
            mu, cm = args.num_iterations, batch[3]  # metrics: averages over the mu passes of the step
            m["loss"] += loss.item() / mu
            m["kl"] += (kl * cm).sum().item() / total_tokens / mu
            m["clip_frac"] += (clipped & cm).sum().item() / total_tokens / mu
        m["grad_norm"] = torch.nn.utils.clip_grad_norm_(scorer.parameters(), args.max_grad_norm).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    for k in ("loss", "kl", "clip_frac"):
        m[k] = all_reduce(m[k]).item()
    return m


LOG_KEYS = ("train/self_certainty", "train/accuracy", "train/completion_length", "train/truncated_frac", "train/kl",
            "train/loss", "train/grad_norm", "train/lr", "perf/sample_tokens_per_s", "perf/sample_s", "perf/update_s")


def seed_step(seed, step, rank):
    """Every (step, rank) gets its own stream: ranks sample differently, and a resumed run samples as an
    uninterrupted one would."""
    s = (seed * 1_000_003 + step * 1009 + rank) % 2**63
    random.seed(s)
    torch.manual_seed(s)


def latest_checkpoint(output_dir):
    steps = [int(d.split("-")[1]) for d in os.listdir(output_dir) if d.startswith("checkpoint-")] if os.path.isdir(output_dir) else []
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def save_checkpoint(output_dir, step, lm, tokenizer, optimizer, scheduler, args):
    """model + tokenizer (save_pretrained) and optimizer, scheduler and data position, written to a temp
    dir and renamed, so a crash never leaves a half-written checkpoint-N."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "args": asdict(args)}, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)


def train(args):
    from transformers import get_cosine_schedule_with_warmup
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    check_args(args, world)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and cuda)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    log = tqdm.write if rank == 0 else (lambda *a, **k: None)

    ckpt = latest_checkpoint(args.output_dir) if args.resume else None
    lm, tokenizer = load_model(ckpt or args.model, device)
    prompts, skipped = load_prompts(args, tokenizer)
    if len(prompts) < args.prompts_per_step:
        die(f"only {len(prompts)} prompts fit --max_prompt_length {args.max_prompt_length} ({skipped} skipped); "
            f"lower --prompts_per_step or raise --max_prompt_length")
    weights, has_gold = parse_reward(args.reward), any(p["gold"] is not None for p in prompts)
    if "accuracy" in weights and not has_gold:
        die("--reward accuracy needs gold answers: the dataset has no `answer`/`solution` column; pass --answer_column")
    ref = None
    if args.beta > 0 or args.certainty_model == "reference":
        ref_lm = load_model(args.model, device)[0] if ckpt else copy.deepcopy(lm)
        ref_lm.requires_grad_(False).eval().to(torch.bfloat16 if bf16 else torch.float32)
        ref = CompletionLogProbs(ref_lm, args.temperature, args.chunk_size, args.vocab_chunk_size)
    stop_ids = stop_token_ids(tokenizer, lm)
    max_steps = args.max_steps if args.max_steps > 0 else len(prompts) // args.prompts_per_step
    optimizer = torch.optim.AdamW(lm.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    total = max_steps * args.num_iterations
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(args.warmup_ratio * total), total)
    start = 0
    if ckpt:
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
    if args.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = CompletionLogProbs(lm, args.temperature, args.chunk_size, args.vocab_chunk_size)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None, broadcast_buffers=False)

    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        kept = [line for line in open(metrics_path) if json.loads(line)["step"] <= start] if ckpt and os.path.exists(metrics_path) else []
        with open(metrics_path, "w") as f:  # records of steps that will be redone are dropped
            f.writelines(kept)
        log(f"{len(prompts)} prompts ({skipped} over {args.max_prompt_length} tokens skipped), {max_steps} steps, "
            f"{world} rank(s) on {device.type}{', bf16 autocast' if bf16 else ''}" + (f", resumed from {ckpt}" if ckpt else ""))

    G = args.num_generations
    for step in tqdm(range(start, max_steps), initial=start, total=max_steps, disable=rank != 0, desc="steps"):
        seed_step(args.seed, step, rank)
        batch = step_prompts(prompts, step, args.prompts_per_step, rank, world, args.seed)

        # 1-2. sample G completions per prompt; their self-certainty is the reward
        t0 = time.time()
        lm.eval()
        per_call = (args.generation_batch_size or len(batch) * G) // G
        rollouts = []
        for i in range(0, len(batch), per_call):
            with autocast():
                rollouts += sample(lm, [p["ids"] for p in batch[i:i + per_call]], G, args.max_completion_length,
                                   args.temperature, stop_ids, tokenizer.pad_token_id)
        t_sample = time.time() - t0
        if has_gold or "plurality" in weights:  # answers: for the GRPO / GRPO-PV rewards and the accuracy monitor
            from eval import extract_answer, is_correct
            for k, r in enumerate(rollouts):
                r["answer"] = extract_answer(tokenizer.decode(r["completion"], skip_special_tokens=True), "math")
                r["correct"] = is_correct(r["answer"], batch[k // G]["gold"])

        # 3. rewards and group-normalised advantages (groups never straddle ranks)
        t0, lr = time.time(), scheduler.get_last_lr()[0]
        if ref is not None:
            reference_pass(ref, rollouts, args, tokenizer.pad_token_id, autocast)
        rewards = compute_rewards(rollouts, weights, G, offline=args.certainty_model == "reference")
        for r, a in zip(rollouts, mixed_advantages(rewards, weights, G).tolist()):
            r["advantage"] = a

        # 4. policy update
        lm.train()
        m = optimize(model, optimizer, scheduler, rollouts, args, tokenizer.pad_token_id, autocast)
        t_update = time.time() - t0

        # metrics: means over all ranks' sequences
        n = all_reduce(len(rollouts)).item()
        mean = lambda xs: all_reduce(float(sum(xs))).item() / n  # noqa: E731
        sc, lengths = [r["self_certainty"] for r in rollouts], [len(r["completion"]) for r in rollouts]  # the policy's SC
        record = {
            "step": step + 1, "train/self_certainty": mean(sc),
            "train/self_certainty_std": math.sqrt(max(mean(x * x for x in sc) - mean(sc) ** 2, 0.0)),
            **{f"train/reward/{k}": mean(v.tolist()) for k, v in rewards.items()},
            **({"train/accuracy": mean(r["correct"] for r in rollouts)} if has_gold else {}),
            "train/completion_length": mean(lengths),
            "train/completion_length_max": all_reduce(max(lengths), dist.ReduceOp.MAX).item(),
            "train/truncated_frac": mean(r["truncated"] for r in rollouts),
            **{f"train/{k}": v for k, v in m.items()}, "train/lr": lr,
            "perf/sample_tokens_per_s": mean(lengths) * n / t_sample, "perf/sample_s": t_sample, "perf/update_s": t_update}
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            log(f"step {step + 1}/{max_steps} | " + " | ".join(f"{k.split('/')[-1]} {record[k]:.4g}" for k in LOG_KEYS if k in record))
            if args.log_completions_steps and (step + 1) % args.log_completions_steps == 0:
                r = rollouts[0]
                log(f"--- sample completion (sc {r['self_certainty']:.3f}) ---\n{tokenizer.decode(r['completion'])[:1000]}\n---")
        if (args.save_steps and (step + 1) % args.save_steps == 0) or step + 1 == max_steps:
            if rank == 0:
                save_checkpoint(args.output_dir, step + 1, lm, tokenizer, optimizer, scheduler, args)
            if world > 1:
                dist.barrier()
    if world > 1:
        dist.destroy_process_group()
    return lm


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    from transformers import HfArgumentParser
    return HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)[0]


if __name__ == "__main__":
    if sys.argv[1:2] == ["plot"]:  # python intuitor.py plot RUN/metrics.jsonl [out.png]
        from eval import plot_metrics
        plot_metrics(*sys.argv[2:4])
    else:
        train(parse_args(sys.argv[1:]))
