"""
Variations of INTUITOR from the wider literature, each entered in one of intuitor.py's registries, so that a flag
value selects it (docs/ablations.md has each one's source, flag and recipe). intuitor.py holds the paper's
method and never imports this file; this file imports intuitor.py and adds to its registries:

    REWARDS            neg_entropy, token_self_certainty, mean_logprob, answer_self_certainty
    ADVANTAGES         batch (the step's std), none (Dr. GRPO: no std)       --scale_rewards
    REWARD_MIXINGS     official (the official INTUITOR trainer's rule)         --reward_mixing
    KL_ESTIMATORS      k1, k2                                                  --kl_estimator
    IMPORTANCE_RATIOS  sequence (GSPO)                                         --importance_sampling_level
    LOSS_AGGREGATIONS  dr_grpo (Dr. GRPO)                                      --loss_type

A fork adds its own the same way: a function, and one entry in the registry (a flag of its own, if it needs
one, in Args' variations group; the function reads it from `args`).
"""

import math

import torch

from intuitor import (
    ADVANTAGES,
    IMPORTANCE_RATIOS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    REWARD_MIXINGS,
    REWARDS,
    Reward,
    zero_equal_groups,
)
from intuitor_harness import process


# ----------------------------------------------------------------------------- rewards
def neg_entropy(rollouts, num_generations, args):
    """Minus the mean token entropy of the completion's next-token distributions, at temperature 1 (the
    alternative to self-certainty the paper argues against, Sec. 3)."""
    return [-r.entropy for r in rollouts]


def token_self_certainty(rollouts, num_generations, args):
    """Token level: each token's own self-certainty, so each token gets its own advantage (a token-level
    intrinsic reward, as the token-level entropy reward of EM-RL: Agarwal et al., "The Unreasonable
    Effectiveness of Entropy Minimization in LLM Reasoning", arXiv 2505.15134)."""
    return [r.token_certainty for r in rollouts]


def mean_logprob(rollouts, num_generations, args):
    """RLSC-style: the mean log-probability of the sampled tokens (Li et al., "Confidence is All You Need:
    Few-Shot RL Fine-Tuning of Language Models", arXiv 2506.06395)."""
    return [r.token_logp.mean().item() for r in rollouts]


def answer_self_certainty(rollouts, num_generations, args):
    """Self-certainty over the final answer's tokens only, the whole completion when it has no answer
    (confidence where the answer is written, as RENT finds most telling: Prabhudesai et al., "Maximizing
    Confidence Alone Improves Reasoning", arXiv 2505.22660)."""
    spans = [r.answer_tokens or (0, len(r.completion)) for r in rollouts]
    return [r.token_certainty[a:b].mean().item() for r, (a, b) in zip(rollouts, spans)]


# ----------------------------------------------------------------------------- advantages
def global_std(values):
    """Unbiased std of `values` over all ranks (float64 sums, so the cancellation stays small)."""
    v = values.double()
    n, total, squares = (process.all_reduce(x).item() for x in (v.numel(), v.sum(), (v * v).sum()))
    return math.sqrt(max(squares - total * total / n, 0.0) / max(n - 1, 1))


def batch_scaled_advantages(rewards, num_generations, args=None, eps=1e-4):
    """`--scale_rewards batch`: A_i = (r_i - mean(r_group)) / (std of every reward of the step, all ranks + eps)."""
    r = rewards.view(-1, num_generations)
    return zero_equal_groups(r, (r - r.mean(1, keepdim=True)) / (global_std(rewards) + eps)).view(-1)


def centred_advantages(rewards, num_generations, args=None):
    """`--scale_rewards none`: A_i = r_i - mean(r_group), no std (Dr. GRPO: Liu et al., "Understanding R1-Zero-Like
    Training: A Critical Perspective", arXiv 2503.20783)."""
    r = rewards.view(-1, num_generations)
    return zero_equal_groups(r, r - r.mean(1, keepdim=True)).view(-1)


def token_group_advantages(rewards, num_generations, args=None, eps=1e-4):
    """Token-level advantages from token-level rewards (a list of per-completion tensors): the rule of
    group_advantages with a group's tokens in place of its completions,

        A_{i,t} = (r_{i,t} - mean over the group's tokens) / (std over the group's tokens + eps),

    --scale_rewards batch dividing by the std over every token of the step (all ranks), none by nothing; a
    group whose tokens all have the same reward gets A = 0. Returns a list of tensors shaped like `rewards`."""
    scale = args.scale_rewards if args is not None else "group"
    out = []
    batch_std = global_std(torch.cat(rewards)) if scale == "batch" else None
    for g in range(0, len(rewards), num_generations):
        group = rewards[g : g + num_generations]
        tokens = torch.cat(group)
        mean, equal = tokens.mean(), bool(tokens.amax() == tokens.amin())
        divisor = tokens.std() + eps if scale == "group" else batch_std + eps if scale == "batch" else 1.0
        out += [torch.zeros_like(r) if equal else (r - mean) / divisor for r in group]
    return out


def official_mixing(rewards, weights, num_generations, args):
    """`--reward_mixing official`: the official INTUITOR trainer's rule for several sequence-level rewards. The
    weighted sum of the rewards other than self-certainty is normalised once (so a single such reward's
    positive weight cancels there, while a negative one flips its sign), and self-certainty, normalised on its
    own, is added at its weight (1 in the official code). Both normalisations follow --scale_rewards here; the
    official trainer always divides self-certainty by its group std."""
    advantages_of = ADVANTAGES[args.scale_rewards]
    others = [w * rewards[name] for name, w in weights.items() if name != "self_certainty"]
    advantages = advantages_of(sum(others), num_generations, args) if others else 0.0
    if "self_certainty" in weights:
        advantages = advantages + weights["self_certainty"] * advantages_of(rewards["self_certainty"],
                                                                            num_generations, args)  # fmt: skip
    return advantages.tolist()


official_mixing.sequence_level_only = True  # check_names refuses token-level rewards with it


# ----------------------------------------------------------------------------- KL estimators
# r = log pi_ref - log pi, as for k3. All three are 0 where pi = pi_ref, but only k2 and k3 have a zero
# gradient there: k1's gradient is grad log pi, which pushes even at KL 0.
def kl_k1(logp, ref_logp):
    """k1 = -r: unbiased, can be negative."""
    return logp - ref_logp


def kl_k2(logp, ref_logp):
    """k2 = r^2 / 2: biased, >= 0, low variance."""
    return 0.5 * (ref_logp - logp) ** 2


# ----------------------------------------------------------------------------- the importance ratio
def sequence_ratio(logp, old_logp, completion_mask, args):
    """GSPO (Zheng et al., "Group Sequence Policy Optimization", arXiv 2507.18071; TRL's
    importance_sampling_level="sequence"): one ratio per sequence, the geometric mean of its token ratios,
    s_i = exp(mean_t (log pi - log pi_old)), (B, 1), clipped to its own, much narrower range
    [1 - sequence_epsilon, 1 + sequence_epsilon_high]. With num_iterations 1, s_i = 1 and its gradient is the
    mean of the tokens' log-prob gradients: the same update as the token ratio's."""
    log_ratio = ((logp - old_logp) * completion_mask).sum(1) / completion_mask.sum(1).clamp(min=1)
    return torch.exp(log_ratio)[:, None], args.sequence_epsilon, args.sequence_epsilon_high


# ----------------------------------------------------------------------------- loss aggregation
def constant_mean(loss, mask, n):
    """`dr_grpo`: sum over the tokens / (max_completion_length x all sequences of the step), a constant that
    no completion's length changes (Dr. GRPO, arXiv 2503.20783)."""
    return loss.sum() / (n.max_completion_length * n.sequences)


# ----------------------------------------------------------------------------- the entries
REWARDS["neg_entropy"] = Reward(neg_entropy)
REWARDS["token_self_certainty"] = Reward(
    token_self_certainty, reads_policy_certainty=True, advantages=token_group_advantages
)
REWARDS["mean_logprob"] = Reward(mean_logprob)
REWARDS["answer_self_certainty"] = Reward(
    answer_self_certainty, needs_answers=True, needs_answer_spans=True, reads_policy_certainty=True
)
ADVANTAGES["batch"] = batch_scaled_advantages
ADVANTAGES["none"] = centred_advantages
REWARD_MIXINGS["official"] = official_mixing
KL_ESTIMATORS["k1"] = kl_k1
KL_ESTIMATORS["k2"] = kl_k2
IMPORTANCE_RATIOS["sequence"] = sequence_ratio
LOSS_AGGREGATIONS["dr_grpo"] = constant_mean
