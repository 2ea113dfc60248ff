"""Run under torchrun by test_ddp.py. Modes:
train OUT ARGS...   : intuitor.train(ARGS), then every rank saves its weights to OUT/rank{r}.pt
update OUT MODEL    : one optimizer step from fixed rollouts (no sampling), rank 0 saves weights to OUT
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import intuitor as I  # noqa: E402


def fixed_update(model_dir, out, world, rank):
    """The global batch is 4 prompts x G=2; each rank takes its prompts' groups, as train() does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    prompts = [tok(t).input_ids for t in ("What is 2 + 3?", "Let x = 4.", "Solve 3y = 12", "7 * 6")]
    rollouts = I.sample(lm, prompts, 2, 10, 1.0, [tok.eos_token_id], tok.pad_token_id)
    rewards = I.compute_rewards(rollouts, {"self_certainty": 1.0}, 2)
    for r, a in zip(rollouts, I.mixed_advantages(rewards, {"self_certainty": 1.0}, 2).tolist()):
        r.advantage = a
    per_rank = len(rollouts) // world
    mine = rollouts[rank * per_rank : (rank + 1) * per_rank]
    ref_lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)
    with torch.no_grad():
        ref_lm.lm_head.weight.mul_(0.9)  # a reference that differs, so the KL term has a gradient
    model = I.CompletionLogProbs(lm, 1.0, 8, 64)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD(
        lm.parameters(), lr=1.0
    )  # weight change = gradient: Adam would amplify fp noise in tiny grads
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    I.reference_pass(I.CompletionLogProbs(ref_lm, 1.0, 8, 64), mine, 3, tok.pad_token_id)
    loss_type = os.environ.get("LOSS_TYPE", "token")
    config = I.UpdateConfig(
        beta=0.05,
        epsilon=0.2,
        epsilon_high=0.2,
        loss_type=loss_type,
        micro_batch_size=3,
        num_iterations=1,
        max_grad_norm=1e9,
    )  # no clipping: it would hide a scale error
    I.optimize(model, opt, sched, mine, tok.pad_token_id, config)
    if rank == 0:
        torch.save(lm.state_dict(), out)


if __name__ == "__main__":
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "train":
        lm = I.train(I.parse_args(sys.argv[3:]))
        torch.save(lm.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    else:
        if world > 1:
            dist.init_process_group("gloo")
        fixed_update(sys.argv[3], out, world, rank)
        if world > 1:
            dist.destroy_process_group()
