"""The process a run lives in: flags and checks, ranks and devices, collectives, models and sharding, the memory plan.

Bad input ends in `die`: one `error:` line naming the fix, before any model loads.
"""

import argparse
import copy
import math
import os
import types
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache

import torch
import torch.distributed as dist


def die(msg):
    """Bad input ends here: one line naming the fix, exit status 1, no traceback (printed by rank 0 only)."""
    raise SystemExit(f"error: {msg}" if int(os.environ.get("RANK", 0)) == 0 else 1)


def parse_flags(dataclass_type, argv, epilog=None, registries=None):
    """Command-line flags into the dataclass; an unknown or malformed flag is one error line, not a traceback.

    --help shows each flag once (snake_case; the kebab-case spelling is accepted too), in the groups its
    field's metadata names, and for a flag in `registries` (flag -> registry) the registry's names, read
    when --help runs, so that an entry a fork adds is listed."""
    from transformers import HfArgumentParser

    class Help(argparse.ArgumentDefaultsHelpFormatter):  # no "(default: None)" after a required flag
        def _get_help_string(self, action):
            return action.help if action.default in (None, "") else super()._get_help_string(action)

        def _format_action_invocation(self, action):  # --flag VALUE, not --flag VALUE, --flag-name VALUE
            if not action.option_strings:
                return super()._format_action_invocation(action)
            value = f" {self._format_args(action, action.dest.upper())}" if action.nargs != 0 else ""
            return ", ".join(s for s in action.option_strings if "-" not in s[2:]) + value

    class Parser(HfArgumentParser):  # each flag in the --help group its field's metadata names
        @staticmethod
        def _parse_dataclass_field(parser, field):
            field = copy.copy(field)
            metadata = dict(field.metadata)
            group = metadata.pop("group", None)
            field.metadata = types.MappingProxyType(metadata)
            if group is not None:
                parser = groups.get(group) or groups.setdefault(group, parser.add_argument_group(group))
            HfArgumentParser._parse_dataclass_field(parser, field)

    groups = {}
    parser = Parser(dataclass_type, formatter_class=Help, epilog=epilog)
    for action in parser._actions:
        if action.option_strings and action.option_strings[0].startswith("--no_"):  # HfArgumentParser's negation
            flag = action.option_strings[0].replace("--no_", "--", 1)
            action.help, action.default = f"the same as {flag} false", None  # no "(default: False)" beside it
        if action.dest in (registries or {}):
            action.help = f"{action.help}; one of: {', '.join(registries[action.dest])}"

    def usage_error(message):
        die(f"{message}; run with --help to list the flags")

    parser.error = usage_error
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        usage_error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def check_train_args(args, rt):
    """Every flag checked before anything loads; the first one out of range ends the run with one line."""
    a, inf, world_size = args, math.inf, rt.world_size
    if not a.num_generations >= 2:  # first: the rules below divide by it
        die("--num_generations must be >= 2: advantages are normalised within a group")
    rules = [
        (
            a.prompts_per_step >= 1 and a.prompts_per_step % world_size == 0,
            f"--prompts_per_step ({a.prompts_per_step}) must be a positive multiple of the world size ({world_size})",
        ),
        (
            a.generation_batch_size >= 0 and a.generation_batch_size % a.num_generations == 0,
            f"--generation_batch_size ({a.generation_batch_size}) must be a multiple of --num_generations (0 = all)",
        ),
        (0 < a.temperature < inf, "--temperature must be a number > 0 (GRPO needs distinct samples per group)"),
        (
            a.top_k >= 0 and a.top_k != 1,
            "--top_k must be 0 (every token) or >= 2: 1 makes every completion of a "
            "group the same, so nothing would be learned",
        ),  # fmt: skip
        (0 <= a.seed < 2**62, "--seed must be in [0, 2**62)"),
        (
            0 <= a.sequence_epsilon < 1 and 0 <= a.sequence_epsilon_high < inf,
            "--sequence_epsilon must be in [0, 1), --sequence_epsilon_high >= 0",
        ),  # fmt: skip
        (0 < a.top_p <= 1, "--top_p must be in (0, 1]: 0 would make every completion of a group the same"),
        (0 < a.learning_rate < inf, "--learning_rate must be a number > 0"),
        (0 <= a.beta < inf, "--beta must be a number >= 0 (0 skips the reference model)"),
        (0 <= a.epsilon < 1 and 0 <= a.epsilon_high < inf, "--epsilon must be in [0, 1), --epsilon_high >= 0"),
        (0 <= a.warmup_ratio <= 1, "--warmup_ratio must be in [0, 1]"),
        (0 < a.max_grad_norm <= inf and 0 <= a.weight_decay < inf, "--max_grad_norm must be > 0, --weight_decay >= 0"),
        (a.max_steps == -1 or a.max_steps >= 1, "--max_steps must be >= 1, or -1 for --num_train_epochs epochs"),
        (a.num_train_epochs >= 1, "--num_train_epochs must be >= 1"),
        (
            a.sampling_weights != "bf16" or rt.bf16,
            "--sampling_weights bf16 samples under bf16 autocast: run on CUDA or pass --dtype bfloat16",
        ),
        (
            a.parallel != "fsdp" or a.sampler == "eager" or a.sampling_weights == "bf16",
            "--parallel fsdp --sampler static samples from a full copy: add --sampling_weights bf16",
        ),
        (
            a.parallel != "fsdp" or "MASTER_ADDR" in os.environ,
            "--parallel fsdp runs under torchrun: torchrun --nproc_per_node=N intuitor.py --parallel fsdp ...",
        ),
    ]
    for name in (
        "micro_batch_size",
        "chunk_size",
        "vocab_chunk_size",
        "max_completion_length",
        "num_iterations",
        "max_prompt_length",
    ):
        rules.append((getattr(a, name) >= 1, f"--{name} must be >= 1"))
    for name in ("save_steps", "save_total_limit", "log_completions_steps"):
        rules.append((getattr(a, name) >= 0, f"--{name} must be >= 0"))
    for ok, message in rules:
        if not ok:  # NaN fails every comparison, so it lands here too
            die(message)
    if (a.resume or a.resume_from_checkpoint) and a.overwrite_output_dir:
        die("--resume and --overwrite_output_dir contradict each other; pass one")
    check_tracker(a.report_to)
    check_device(a.device)


def check_tracker(report_to):
    """--report_to needs its package, and wandb a login (or offline mode), before anything loads."""
    import importlib.util

    if report_to != "none" and importlib.util.find_spec(report_to if report_to == "wandb" else "tensorboard") is None:
        die(f"--report_to {report_to}: the {report_to} package is not installed; pip install {report_to}, or pass "
            "--report_to none (metrics.jsonl is always written)")  # fmt: skip
    if report_to == "wandb" and os.environ.get("WANDB_MODE") not in ("offline", "disabled", "dryrun"):
        netrc = os.path.join(os.path.expanduser("~"), ".netrc")
        logged_in = os.path.isfile(netrc) and "api.wandb.ai" in open(netrc, errors="replace").read()
        if not (os.environ.get("WANDB_API_KEY") or logged_in):
            die("--report_to wandb: no wandb login here; run `wandb login`, set WANDB_API_KEY, or set "
                "WANDB_MODE=offline to log locally")  # fmt: skip


def check_device(device):
    """--device cuda needs a CUDA device (training and eval.py alike)."""
    if device == "cuda" and not torch.cuda.is_available():
        die("--device cuda: no CUDA device here; pass --device cpu")


# ----------------------------------------------------------------------------- ranks and devices
@dataclass
class Runtime:
    """Where this process runs: its rank among `world_size` (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK;
    plain python is one process), its device, and whether compute runs under bf16 autocast."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    bf16: bool = False

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def __str__(self):
        return f"{self.world_size} rank(s) on {self.device.type}{', bf16 autocast' if self.bf16 else ''}"


def runtime_from_env(device="auto", dtype="auto"):
    """Rank, world size and device from the environment, without touching the device."""
    rank, world_size, local_rank = (int(os.environ.get(key, 0)) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    bf16 = dtype == "bfloat16" or (dtype == "auto" and cuda)
    where = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    return Runtime(rank, max(world_size, 1), local_rank, where, bf16)


def init_distributed(rt, always=False):
    """Select the GPU and join the process group (NCCL on CUDA, gloo on CPU) when there are several ranks (or
    `always`: FSDP2 needs one even for a single rank)."""
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)
    if rt.world_size > 1 or always:
        dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo")


def leave_process_group(rt):
    """The end of a run with several ranks: wait until every rank is done with the group, then leave it (a rank
    tearing its connections down while another still uses them can abort that rank at exit)."""
    if rt.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def on_first_rank(check):
    """Run check() on rank 0 alone (a lock, a directory) and share its verdict: when it fails with one error
    line, every rank stops with it, so no rank is left waiting on one that has exited. Before the process group
    exists (or in one process) rank 0 just runs it."""
    rank = int(os.environ.get("RANK", 0))
    if not dist.is_initialized():
        return check() if rank == 0 else None
    verdict, result = [None], None
    if rank == 0:
        try:
            result = check()
        except SystemExit as stop:
            verdict = [str(stop.code)]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        dist.destroy_process_group()
        raise SystemExit(verdict[0] if rank == 0 else 1)
    return result


def all_reduce(x, op=dist.ReduceOp.SUM):
    """Sum (or max) a float or tensor over ranks; identity in a single process."""
    on_gpu = dist.is_initialized() and dist.get_backend() == "nccl"
    t = torch.as_tensor(x, dtype=torch.float64, device="cuda" if on_gpu else "cpu")
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def gather(values):
    """Every rank's list, concatenated (a single process: the list itself)."""
    if not dist.is_initialized():
        return list(values)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(values))
    return [v for part in parts for v in part]


# ----------------------------------------------------------------------------- models
def model_source(name):
    """(where, from_pretrained keyword arguments) of --model, checked without reading it: a .gguf file needs two
    optional packages, a path must exist, a hub id needs the hub (or HF_HUB_OFFLINE=1 and the cache)."""
    kwargs = {}
    if name.endswith(".gguf"):
        try:
            import accelerate  # noqa: F401  (transformers needs both to read GGUF)
            import gguf  # noqa: F401
        except ImportError:
            die("loading a .gguf model needs two optional packages: pip install gguf accelerate")
        kwargs, name = {"gguf_file": os.path.basename(name)}, os.path.dirname(os.path.abspath(name))
    elif not os.path.exists(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        die(f"--model {name!r}: no such file or directory; pass a hub id, a local model directory or a .gguf file")
    elif not os.path.exists(name):
        check_hub([("--model", name, "model")])
    elif os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        steps = sorted(n for n in os.listdir(name) if n.startswith("checkpoint-"))
        if steps:  # a training run's folder: its checkpoints are the models
            die(f"--model {name!r} is a training run's folder, not a model; pass one of its checkpoints, such as "
                f"{os.path.join(name, steps[-1])!r}")  # fmt: skip
    return name, kwargs


def cannot_load(name, error):
    """A model that is there (a local path, or cached) but cannot be read: damaged, incomplete or not a model."""
    reason = (str(error).splitlines() or [type(error).__name__])[0]
    fix = "copy it again" if os.path.exists(name) else "download it again (it is in the local cache)"
    die(f"cannot load --model {name!r} ({type(error).__name__}: {reason}); if it is damaged or incomplete, {fix}; "
        "else pass a hub id, a model folder or a .gguf file")  # fmt: skip


def load_tokenizer(name):
    """The tokenizer of --model alone: prompts can be counted and checked before the weights load."""
    from transformers import AutoTokenizer

    where, kwargs = model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as e:  # noqa: BLE001 - a missing, damaged or foreign file: one line, whatever the reader raised
        cannot_load(name, e)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        die(f"--model {name!r}: its tokenizer has neither an eos nor a pad token, so completions could neither end "
            "nor be padded; pass a model whose tokenizer defines eos_token")  # fmt: skip
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_vocabulary(name, tokenizer, lm):
    """Every token id the tokenizer can produce must have a row in the model's embedding."""
    rows = lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        die(f"--model {name!r}: its tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}; "
            "pass a tokenizer and weights that belong together")  # fmt: skip


def load_model(name, device):
    """Policy + tokenizer from a hub id, a local directory, or a local .gguf file (dequantised to fp32)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(name)
    where, kwargs = model_source(name)
    try:
        lm = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    except Exception as e:  # noqa: BLE001 - a truncated safetensors file, a .gguf that is not one, ...
        cannot_load(name, e)
    if getattr(lm.config, "quantization_config", None) is not None:
        # GGUF weights arrive dequantised but tagged as quantised, which save_pretrained refuses: rebuild plainly.
        del lm.config.quantization_config
        plain = AutoModelForCausalLM.from_config(lm.config, dtype=torch.float32)
        plain.load_state_dict(lm.state_dict())
        lm = plain
    check_vocabulary(name, tokenizer, lm)
    head = lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None or getattr(lm.config, "final_logit_softcapping", None):
        die(f"{name}: the streamed lm_head assumes logits = h @ W.T (no bias, no soft-capping)")
    return lm.to(device), tokenizer


def ddp_buffer_arguments():
    """DDP without syncing buffers on every forward (the RoPE frequencies are the same on every rank): newer
    torch names it forward_sync_buffers and warns about the old broadcast_buffers."""
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def cache_argument(policy):
    """The name under which the installed transformers takes the KV cache: `cache` from 5.24 on,
    `past_key_values` before (5.24 warns that the old name goes in 5.40). Passed under a name the model does not
    know, the cache would be dropped and every decode step would see one token alone."""
    import inspect

    return "cache" if "cache" in inspect.signature(policy.forward).parameters else "past_key_values"


@cache
def hub_reachable():
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def in_hub_cache(name, repo_type="model"):
    """Whether a hub id's files are in the local cache (what HF_HUB_OFFLINE=1 can load)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(name, repo_type=repo_type, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - not cached, in whatever way the hub library says so
        return False


def check_hub(inputs):
    """Hub ids need the hub, or their files in the local cache: one line for all of them, in seconds, naming what
    to do (docs/data.md makes local copies) instead of minutes of retries. `inputs`: (flag, name, repo type) of
    each input that is not a local path."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
    if not inputs or (not offline and hub_reachable()):
        return
    missing = [(flag, name) for flag, name, kind in inputs if not in_hub_cache(name, kind)]
    if not missing:
        if not offline:  # all cached: say how to use the cache
            names = " and ".join(f"{flag} {name!r}" for flag, name, _ in inputs)
            die(f"the Hugging Face hub is unreachable; {names} are in the local cache: set HF_HUB_OFFLINE=1 to use it")
        return
    names = " and ".join(f"{flag} {name!r}" for flag, name in missing)
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
    die(f"{why} and {names} {'is' if len(missing) == 1 else 'are'} not in the local cache: pass local copies instead "
        "(a model folder or .gguf file; a dataset .jsonl: docs/data.md shows how to make them where the hub is "
        "reachable)")  # fmt: skip


def hub_id(name):
    """Whether --model or --dataset names a hub repository rather than a local path."""
    return not os.path.exists(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1


# ----------------------------------------------------------------------------- memory plan
def saved_bytes_per_token_and_layer(config, bf16):
    """Bytes one token leaves saved for backward in one decoder layer (SDPA attention), as measured with
    torch.autograd.graph.saved_tensors_hooks on Qwen2 shapes (tests/test_gpu_paths.py measures it again).

    Under bf16 autocast: 30 h = the two RMSNorms' fp32 inputs and outputs (16 h) + the bf16 casts of every
    projection's input (q, k, v and gate, up each cast separately, o: 12 h) + the bf16 query (2 h); 4 kv hd =
    keys and values; 8 inter = the MLP's gate, up, activation and product; 4 per head = attention's fp32
    logsumexp; 8 = the norms' fp32 inverse RMS. In fp32 the casts go and everything doubles: 32 h + 8 kv hd +
    16 inter + the same small terms."""
    hidden, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    act = 2 if bf16 else 4
    return (30 if bf16 else 32) * hidden + 2 * act * kv * head_dim + 4 * act * inter + 4 * heads + 8


def memory_plan(config, n_params, args, world_size=1, bf16=True):
    """GiB one rank needs, by what holds them, from the model's shape and the flags (printed at start).

    - Always: fp32 master weights and AdamW's two moments; the frozen reference and the bf16 sampling copy
      when used (bf16 matmul weights, fp32 embedding: see intuitor.freeze; fp32 without bf16).
    - Sampling: the KV cache of one generation batch (prompt + completion tokens per sequence); under autocast
      the bf16 copies it makes of the policy's weights (2 bytes a parameter), unless sampling from the copy.
    - Update: fp32 gradients; autocast's bf16 weight copies; one micro-batch's saved activations
      (saved_bytes_per_token_and_layer; with gradient checkpointing, one fp32 hidden state per layer plus one
      layer recomputed); for a head tied to the input embedding, the embedding's dense V x H fp32 gradient.
    With --parallel fsdp, weights, gradients, AdamW state and the (fp32) reference are sharded over the ranks;
    sampling gathers the full fp32 weights for the phase (or reads the full bf16 sampling copy); the update holds
    the root unit (embedding, lm_head) and two decoder layers unsharded, with their gradients, at a time.
    Peak = persistent + the larger phase. CUDA context and allocator slack come on top."""
    act, gib = (2 if bf16 else 4), 2**30
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    embedding = getattr(config, "vocab_size", 0) * hidden
    tied = getattr(config, "tie_word_embeddings", False)
    sequences = args.generation_batch_size or args.prompts_per_step // world_size * args.num_generations
    tokens = args.max_prompt_length + args.max_completion_length
    per_layer = saved_bytes_per_token_and_layer(config, bf16)
    checkpointed = layers * 4 * hidden + per_layer if args.gradient_checkpointing else layers * per_layer
    frozen_copy = 2 * n_params + 2 * embedding if bf16 else 4 * n_params  # bf16 matmuls, fp32 embedding
    sampling_copy = args.sampling_weights == "bf16"
    plan = {
        "weights (fp32)": 4 * n_params,
        "AdamW moments": 8 * n_params,
        "reference": frozen_copy if args.beta > 0 or args.certainty_model == "reference" else 0,
        "bf16 sampling copy": frozen_copy if sampling_copy else 0,
        "KV cache (sampling)": 2 * layers * kv * head_dim * act * sequences * tokens,
        "autocast weight copies (sampling)": 2 * n_params if bf16 and not sampling_copy else 0,
        "gradients (update)": 4 * n_params,
        "autocast weight copies (update)": 2 * n_params if bf16 else 0,
        "activations (update)": checkpointed * args.micro_batch_size * tokens,
        "tied embedding gradient (update)": 4 * embedding if tied else 0,
    }
    if args.parallel == "fsdp":
        root = embedding * (1 if tied else 2)  # the root unit: embedding and lm_head (norms are negligible)
        layer = (n_params - root) / layers
        plan.update({
            "weights (fp32)": 4 * n_params / world_size,
            "AdamW moments": 8 * n_params / world_size,
            "reference": 4 * n_params / world_size if plan["reference"] else 0,
            "unsharded weights (sampling)": 0 if sampling_copy else 4 * n_params * (world_size - 1) / world_size,
            "gradients (update)": 4 * n_params / world_size,
            "autocast weight copies (update)": 2 * (root + 2 * layer) if bf16 else 0,
            "unsharded units in flight (update)": 8 * (root + 2 * layer),  # weights and their gradients
        })  # fmt: skip
    plan = {key: value / gib for key, value in plan.items()}
    persistent = plan["weights (fp32)"] + plan["AdamW moments"] + plan["reference"] + plan["bf16 sampling copy"]
    sampling = sum(value for key, value in plan.items() if key.endswith("(sampling)"))
    update = sum(value for key, value in plan.items() if key.endswith("(update)"))
    plan["peak"] = persistent + max(sampling, update)
    return plan


def check_memory(plan, rt):
    """Print the plan (rank 0); on a device it cannot fit, one error line naming the flags that shrink it."""
    if rt.device.type == "cuda":
        where = torch.cuda.get_device_name(rt.device)
        capacity = torch.cuda.get_device_properties(rt.device).total_memory / 2**30
    else:  # the ranks of one machine share its memory
        where = "this machine's memory"
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / rt.world_size / 2**30
    if rt.rank == 0:
        import textwrap

        parts = ", ".join(f"{key} {value:.1f}" for key, value in plan.items() if key != "peak")
        print(f"memory plan per rank: peak {plan['peak']:.1f} GiB of {capacity:.1f} ({where}), in GiB:", flush=True)
        print(textwrap.fill(parts, 118, initial_indent="  ", subsequent_indent="  "), flush=True)
    if plan["peak"] > capacity:
        die(
            f"the memory plan ({plan['peak']:.1f} GiB per rank) exceeds {where} ({capacity:.1f} GiB): lower "
            "--generation_batch_size (KV cache), --micro_batch_size, or add --gradient_checkpointing (activations)"
        )


# ----------------------------------------------------------------------------- sharding (FSDP2)
def shard(scorer, rt):
    """FSDP2 over a CompletionLogProbs: each decoder layer is one unit (its weights all-gathered for its forward
    and backward, its gradients reduce-scattered), the scorer the root unit (embedding, final norm, lm_head).
    Weights stay fp32 shards (AdamW's master copy); compute runs under the run's autocast, as with DDP, so every
    rank computes what one process would. Shards move to the run's device."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh(rt)
    for layer in scorer.lm.base_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(scorer, mesh=mesh)
    scorer._get_fsdp_state()._lazy_init()  # the root first, before any forward runs through a layer alone
    return scorer


def device_mesh(rt):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(rt.device.type, (rt.world_size,))


class unsharded:  # noqa: N801 - used as a context manager, like torch.no_grad
    """FSDP2: every unit's full weights, all-gathered once, kept for the whole block (sampling: each rank decodes
    a different number of steps, so no per-step collective could be matched across ranks), then resharded.
    The full fp32 weights are counted by the memory plan. A no-op for replicated weights."""

    def __init__(self, scorer):
        from torch.distributed.fsdp import FSDPModule

        self.units = [m for m in scorer.modules() if isinstance(m, FSDPModule)]

    def __enter__(self):
        for unit in self.units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()

    def __exit__(self, *exc):
        for unit in self.units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not self.units[0], recurse=False)  # the root keeps its own


def is_sharded(module):
    """Whether FSDP2 holds `module`'s parameters as shards (DTensors)."""
    return any(hasattr(p, "to_local") for p in module.parameters())


def full_state_dicts(policy, optimizer):
    """The policy's weights and AdamW state, full and keyed by parameter name, on rank 0's CPU (sharded weights
    are gathered; every rank must call this). Empty on other ranks, which copy nothing when weights are replicated."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if not is_sharded(policy) and int(os.environ.get("RANK", 0)) != 0:
        return {}, {}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(policy, optimizer, options=options)


def load_full_optimizer_state(policy, optimizer, state):
    """Load a full, name-keyed AdamW state into replicated or sharded weights (each rank keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    full = is_sharded(policy)  # a full state into shards; replicated weights take it as is
    set_optimizer_state_dict(policy, optimizer, state, options=StateDictOptions(full_state_dict=full))


def all_finite(module):
    """True on every rank if no parameter (or shard of one) holds NaN/inf: one reduction, one device sync."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in module.parameters()]
    finite = torch.stack([torch.isfinite(p).all() for p in local if p.numel()]).all().float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)
