"""Run under torchrun by test_ddp.py and test_fsdp.py. Modes:
train OUT ARGS...   : intuitor.train(ARGS), then (DDP) every rank saves its weights to OUT/rank{r}.pt
update OUT MODEL    : one optimizer step from fixed rollouts (no sampling), rank 0 saves weights to OUT;
                      PARALLEL=fsdp shards the policy with FSDP2 instead of DDP
tiles OUT MODEL     : FSDP2 forward + backward through the streamed head; the largest tensor with a vocabulary
                      dimension that any op made, beside the logits' and the weight's sizes, to OUT (rank 0)
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import intuitor as I  # noqa: E402
from intuitor_harness import process  # noqa: E402


def fixed_update(model_dir, out, world, rank):
    """The global batch is 4 prompts x G=2; each rank takes its prompts' groups, as train() does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    prompts = [tok(t).input_ids for t in ("What is 2 + 3?", "Let x = 4.", "Solve 3y = 12", "7 * 6")]
    rollouts = I.sample(lm, prompts, 2, 10, 1.0, [tok.eos_token_id], tok.pad_token_id)
    rewards = I.compute_rewards(rollouts, {"self_certainty": 1.0}, 2, I.Args())
    for r, a in zip(rollouts, I.weighted_advantages(rewards, {"self_certainty": 1.0}, 2, I.Args())):
        r.advantage = a
    per_rank = len(rollouts) // world
    mine = rollouts[rank * per_rank : (rank + 1) * per_rank]
    ref_lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)
    with torch.no_grad():
        ref_lm.lm_head.weight.mul_(0.9)  # a reference that differs, so the KL term has a gradient
    sharded = os.environ.get("PARALLEL") == "fsdp"
    model = I.CompletionLogProbs(lm, 1.0, 8, 64, sharded=sharded)
    if sharded:
        model = process.shard(model, process.Runtime(rank=rank, world_size=world))
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD(
        lm.parameters(), lr=1.0
    )  # weight change = gradient: Adam would amplify fp noise in tiny grads
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss_type = os.environ.get("LOSS_TYPE", "token")
    config = I.Args(
        beta=0.05,
        loss_type=loss_type,
        micro_batch_size=3,
        max_grad_norm=1e9,
    )  # no clipping: it would hide a scale error
    I.optimize(model, I.CompletionLogProbs(ref_lm, 1.0, 8, 64), opt, sched, mine, tok.pad_token_id, config)
    weights, _ = process.full_state_dicts(lm, opt)
    if rank == 0:
        torch.save(weights, out)


def largest_tensor_under_fsdp(model_dir, out, world, rank):
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    scorer = process.shard(I.CompletionLogProbs(lm, 1.0, 16, 64, sharded=True), process.Runtime(world_size=world))
    torch.manual_seed(rank)
    tokens, V = 400, lm.config.vocab_size  # logits would be 3x the embedding and lm_head together
    rollouts = [I.Rollout([5, 6, 7], torch.randint(0, V, (tokens,)).tolist(), 0.0, 0.0, False)]
    batch = I.collate(rollouts, 0, "cpu")

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(t, torch.Tensor) and V in t.shape:  # logits-like: a vocabulary dimension
                    Largest.numel = max(Largest.numel, t.numel())
            return result

    with Largest():
        scorer(*batch)["logp"].sum().backward()
    if rank == 0:
        torch.save({"largest": Largest.numel, "logits": tokens * V, "weight": V * lm.config.hidden_size}, out)


if __name__ == "__main__":
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "train":
        args = I.parse_args(sys.argv[3:])
        lm = I.train(args)
        if args.parallel == "ddp":  # FSDP2's shards are compared through the checkpoints it writes
            torch.save(lm.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    else:
        if world > 1 or os.environ.get("PARALLEL") == "fsdp" or mode == "tiles":
            dist.init_process_group("gloo")
        (fixed_update if mode == "update" else largest_tensor_under_fsdp)(sys.argv[3], out, world, rank)
        if dist.is_initialized():
            dist.destroy_process_group()
