"""
What intuitor.py (training) and eval.py (evaluation) share around the algorithm, so that both read as their
method: one error line for bad input, ranks and devices, models, questions and how their answers are graded
(the GRPO / GRPO-PV rewards and every benchmark use the same grader; INTUITOR itself never reads a gold
answer), and run directories with their checkpoints. Nothing here imports intuitor.py or eval.py.
"""

import json
import math
import os
import random
import re
import shutil
from collections import Counter
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import torch
import torch.distributed as dist


def die(msg):
    """Bad input ends here: one line naming the fix, exit status 1, no traceback (printed by rank 0 only)."""
    raise SystemExit(f"error: {msg}" if int(os.environ.get("RANK", 0)) == 0 else 1)


# ----------------------------------------------------------------------------- distributed setup
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


def init_distributed(rt):
    """Select the GPU and join the process group (NCCL on CUDA, gloo on CPU) when there are several ranks."""
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)
    if rt.world_size > 1:
        dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo")


def all_reduce(x, op=dist.ReduceOp.SUM):
    """Sum (or max) a float or tensor over ranks; identity in a single process."""
    on_gpu = dist.is_initialized() and dist.get_backend() == "nccl"
    t = torch.as_tensor(x, dtype=torch.float64, device="cuda" if on_gpu else "cpu")
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


# ----------------------------------------------------------------------------- models
def load_model(name, device):
    """Policy + tokenizer from a hub id, a local directory, or a local .gguf file (dequantised to fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        check_hub(name, "--model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        die(f"cannot load --model {name!r} ({str(e).splitlines()[0]}); pass a hub id, a model directory or a .gguf")
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
    generation_eos = getattr(lm.generation_config, "eos_token_id", None)
    ids.update(generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos])
    if tokenizer.chat_template:
        turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "PROBE"}]
        tail = tokenizer.apply_chat_template(turn, tokenize=False).split("PROBE")[-1]
        after = tokenizer(tail, add_special_tokens=False).input_ids
        if after and tokenizer.convert_ids_to_tokens(after[0]) in tokenizer.added_tokens_encoder:
            ids.add(after[0])
    return sorted(i for i in ids if i is not None)


def render_prompt(tokenizer, question, system_prompt):
    """The prompt text the model sees: chat template with the paper's system prompt.

    A tokenizer without a chat template falls back to plain "System: ...\n\nUser: ...\n\nAssistant:" text."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"


# ----------------------------------------------------------------------------- questions
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_rows(path, split, flag="--dataset"):
    """Rows of a hub dataset or a local .json/.jsonl/.parquet file, via datasets.load_dataset; never empty."""
    from datasets import load_dataset

    local = LOCAL_FORMATS.get(os.path.splitext(path)[1])
    if not local and (os.path.isfile(path) or os.path.splitext(path)[1] in (".csv", ".tsv", ".txt")):
        die(f"{flag} {path!r}: not a .json/.jsonl/.parquet file or a hub dataset; convert it to .jsonl")
    if local and not os.path.isfile(path):
        die(f"{flag} {path!r}: no such file")
    if not local:
        check_hub(path, flag)
    try:
        rows = load_dataset(local, data_files=path, split="train") if local else load_dataset(path, split=split)
    except Exception as e:  # noqa: BLE001 - unreadable for any reason (malformed JSON, missing split): one line
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        die(f"cannot load {flag} {path!r} ({reason}); pass a hub dataset or a valid local .jsonl/.parquet file")
    if len(rows) == 0:
        die(f"{flag} {path!r} has no rows")
    return rows


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


def check_hub(name, flag):
    """A hub id needs the hub, or the local cache in offline mode: fail in seconds, not after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "") and not hub_reachable():
        die(
            f"{flag} {name!r}: the Hugging Face hub is unreachable; set HF_HUB_OFFLINE=1 to use the local cache, "
            "or pass a local path"
        )


def check_texts(rows, column, source):
    """The column's values, each a non-empty string; anything else (null, a number) means the wrong column or
    a broken file: rejected, not guessed at."""
    texts = rows[column]
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
    if bad:
        die(
            f"{source}: {len(bad)} of {len(texts)} rows have no question text in {column!r} "
            f"(first: row {bad[0]}, {texts[bad[0]]!r}); fix the file or pick another column"
        )
    return texts


def load_questions(path, split, prompt_column, answer_column="", need_gold=False, flag="--dataset",
                   fix="pass --prompt_column"):  # fmt: skip
    """(rows, questions, gold answers) of a dataset; questions pass check_texts. need_gold: gold answers must
    exist."""
    rows = load_rows(path, split, flag)
    if prompt_column not in rows.column_names:
        die(f"{flag} {path!r} has no column {prompt_column!r} (columns: {', '.join(rows.column_names)}); {fix}")
    questions = check_texts(rows, prompt_column, f"{flag} {path!r}")
    golds = gold_answers(rows, answer_column)
    if need_gold and all(gold is None for gold in golds):
        die(f"{flag} {path!r} has no gold answers (an `answer` or `solution` column); pass --answer_column")
    return rows, questions, golds


class Prompt(NamedTuple):
    ids: list  # prompt token ids, chat template applied
    gold: str | None  # gold answer, for the accuracy reward and monitor only


def load_prompts(questions, golds, tokenizer, system_prompt, max_prompt_length):
    """Tokenised prompts with their gold answers; those over max_prompt_length are skipped and counted."""
    prompts, skipped = [], 0
    for question, gold in zip(questions, golds):
        ids = tokenizer(render_prompt(tokenizer, question, system_prompt), add_special_tokens=False).input_ids
        if len(ids) > max_prompt_length:
            skipped += 1
        else:
            prompts.append(Prompt(ids, gold))
    return prompts, skipped


def step_prompts(prompts, step, prompts_per_step, rank, world_size, seed):
    """This rank's prompts of a step: a seeded shuffle per epoch that every rank agrees on, cut into
    consecutive blocks, so no prompt repeats within an epoch and ranks never overlap."""
    epoch, i = divmod(step, len(prompts) // prompts_per_step)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = prompts_per_step // world_size
    start = i * prompts_per_step + rank * per_rank
    return [prompts[j] for j in order[start : start + per_rank]]


# A task a 135M model can learn on a CPU: short arithmetic questions in GSM8K's columns (the CPU-sized Table 1).
ARITHMETIC_PHRASINGS = {
    "+": ["What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}.",
          "Tom has {a} marbles and finds {b} more. How many marbles does he have now?"],
    "-": ["What is {a} - {b}?", "Compute {a} minus {b}.", "Subtract {b} from {a}.",
          "A shop had {a} apples and sold {b}. How many apples are left?"],
    "*": ["What is {a} times {b}?", "Compute {a} * {b}.", "Multiply {a} by {b}.",
          "A box holds {b} pens. How many pens are in {a} boxes?"],
}  # fmt: skip


def arithmetic_expressions():
    """Every expression of the task, with its difficulty level: 1 = sums of numbers up to 20, 2 = differences
    of numbers up to 20, 3 = the 2..12 times table (731 in all)."""
    sums = [("+", a, b, 1) for a in range(1, 21) for b in range(1, 21)]
    differences = [("-", a, b, 2) for a in range(1, 21) for b in range(1, a + 1)]
    products = [("*", a, b, 3) for a in range(2, 13) for b in range(2, 13)]
    return sums + differences + products


def arithmetic_splits(n_test=300, seed=0):
    """Deterministic train and test splits of short arithmetic questions in GSM8K's columns. The test split's
    expressions never appear in the training split, however they are phrased; each question's phrasing is
    drawn from ARITHMETIC_PHRASINGS."""
    rng = random.Random(seed)
    expressions = arithmetic_expressions()
    rng.shuffle(expressions)
    rows = []
    for op, a, b, level in expressions:
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = rng.choice(ARITHMETIC_PHRASINGS[op]).format(a=a, b=b)
        rows.append({"question": question, "answer": f"{a} {op} {b} = {result}\n#### {result}", "level": level})
    return rows[n_test:], rows[:n_test]


# ----------------------------------------------------------------------------- answers
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_boxed(text):
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces included; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def extract_answer(completion, answer_format):
    """The prediction: the last \\boxed{} answer; with answer_format "number" (GSM8K-style), else the last
    number of the completion. None when there is no answer."""
    boxed = last_boxed(completion)
    if boxed is not None or answer_format != "number":
        return boxed
    numbers = NUMBER.findall(completion)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def gold_answer(value, column):
    """A gold answer from its column: the text after '####' (GSM8K), the last \\boxed{} of a `solution`,
    else the value itself."""
    value = str(value)
    if "####" in value:
        return value.split("####")[-1].strip().replace(",", "")
    return last_boxed(value) if column == "solution" else value.strip()


def gold_answers(rows, column=""):
    """Gold answers of every row: `column`, else `answer`, else `solution`; None for all when there is none."""
    if column and column not in rows.column_names:
        die(f"--answer_column {column!r} is not a column (columns: {', '.join(rows.column_names)})")
    column = column or next((c for c in ("answer", "solution") if c in rows.column_names), None)
    if column is None:
        return [None] * len(rows)
    return [gold_answer(value, column) for value in rows[column]]


def infer_answer_format(rows, column="", answer_format="auto"):
    """'number' when the gold answers are GSM8K-style '#### N' (a completion's final answer is then its last
    \\boxed{}, else its last number), 'boxed' otherwise (the last \\boxed{} only); an explicit choice stands."""
    if answer_format != "auto":
        return answer_format
    column = column or next((c for c in ("answer", "solution") if c in rows.column_names), None)
    return "number" if column and any("####" in str(v) for v in rows[column][:100]) else "boxed"


def in_math_mode(latex):
    return latex if "$" in latex else f"${latex}$"


def is_correct(pred, gold):
    """Mathematical equivalence by math-verify (fractions vs decimals, LaTeX vs plain); no answer is wrong."""
    if pred is None or gold is None:
        return False
    from math_verify import parse, verify

    try:
        return bool(verify(parse(in_math_mode(gold)), parse(in_math_mode(pred))))
    except Exception:  # math-verify raises on some malformed LaTeX; count it as wrong
        return False


def answer_clusters(answers):
    """Group equivalent answers (math-verify), so '0.5' and '\\frac12' vote together; None never clusters."""
    representatives, labels = [], []
    for answer in answers:
        if answer is None:
            labels.append(None)
            continue
        match = next((k for k, rep in enumerate(representatives) if answer == rep or is_correct(answer, rep)), None)
        if match is None:
            representatives.append(answer)
            match = len(representatives) - 1
        labels.append(match)
    return labels


def plurality_votes(answers):
    """GRPO-PV: 1 for answers equal (by math-verify) to the group's most common extracted answer; ties go to
    the answer seen first, no answer scores 0."""
    labels = answer_clusters(answers)
    counts = Counter(label for label in labels if label is not None)
    top = max(counts, key=lambda c: (counts[c], -c)) if counts else None
    return [float(label is not None and label == top) for label in labels]


# ----------------------------------------------------------------------------- sampling and batches
def sampling_logits(logits, temperature, top_k=0, top_p=1.0):
    """What tokens are drawn from: logits / temperature, then top-k, then nucleus (top-p) filtering. Rewards
    and entropy are read from the raw temperature-1 logits, as the official code does."""
    z = logits / temperature
    if top_k:
        z = z.masked_fill(z < z.topk(min(top_k, z.shape[-1])).values[:, -1:], -math.inf)
    if top_p < 1:
        z_sorted, order = z.sort(-1, descending=True)
        p = torch.softmax(z_sorted, -1)
        outside = p.cumsum(-1) - p > top_p  # tokens after the nucleus has reached top_p
        z = z.scatter(-1, order, z_sorted.masked_fill(outside, -math.inf))
    return z


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
    ids, attn, cmask = [], [], []
    for r in rollouts:
        left, right = width - len(r.prompt), length - len(r.completion)
        ids.append([pad_id] * left + r.prompt + r.completion + [pad_id] * right)
        attn.append([0] * left + [1] * (len(r.prompt) + len(r.completion)) + [0] * right)
        cmask.append([1] * len(r.completion) + [0] * right)
    ids, attn, cmask = (torch.tensor(x, device=device) for x in (ids, attn, cmask))
    return Batch(ids, attn, width, cmask.bool())


def micro_batches(rollouts, size, pad_id, device):
    """(rollouts, Batch) pairs of at most `size` sequences."""
    parts = [rollouts[i : i + size] for i in range(0, len(rollouts), size)]
    return [(part, collate(part, pad_id, device)) for part in parts]


def make_optimizer(lm, args, total_steps, state=None):
    """AdamW with linear warmup then cosine decay over total_steps optimizer steps; resumed from `state`."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(lm.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(args.warmup_ratio * total_steps), total_steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return optimizer, scheduler


@torch.no_grad()
def copy_weights(source, target):
    """Copy every parameter of `source` into `target` (same architecture), casting to target's dtype."""
    for dst, src in zip(target.parameters(), source.parameters(), strict=True):
        dst.copy_(src)


# ----------------------------------------------------------------------------- memory plan
def memory_plan(config, n_params, args, world_size=1, bf16=True):
    """GiB one rank needs, by what holds them, from the model's shape and the flags (an estimate, printed at
    start): fp32 master weights, their gradients (during the update only) and AdamW's two moments; the frozen
    reference (bf16 on GPU); the KV cache of one generation batch (prompt + completion tokens per sequence,
    bf16 under autocast); one micro-batch's saved activations (per token and layer, under autocast: norms'
    fp32 inputs, attention q, k, v and output, the MLP's four intermediates; with gradient checkpointing, one
    fp32 hidden state per layer plus one layer recomputed). Peak = persistent + the larger phase."""
    act, gib = (2 if bf16 else 4), 2**30
    hidden, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    sequences = args.generation_batch_size or args.prompts_per_step // world_size * args.num_generations
    tokens = args.max_prompt_length + args.max_completion_length
    per_layer = 8 * hidden + act * (4 * hidden + 2 * kv * head_dim + 4 * inter)  # bytes per token
    checkpointed = layers * 4 * hidden + per_layer if args.gradient_checkpointing else layers * per_layer
    plan = {
        "weights (fp32)": 4 * n_params,
        "AdamW moments": 8 * n_params,
        "reference": (act * n_params) if args.beta > 0 or args.certainty_model == "reference" else 0,
        "bf16 sampling copy": 2 * n_params if args.sampling_weights == "bf16" else 0,
        "KV cache (sampling)": 2 * layers * kv * head_dim * act * sequences * tokens,
        "gradients (update)": 4 * n_params,
        "activations (update)": checkpointed * args.micro_batch_size * tokens,
    }
    plan = {key: value / gib for key, value in plan.items()}
    persistent = plan["weights (fp32)"] + plan["AdamW moments"] + plan["reference"] + plan["bf16 sampling copy"]
    plan["peak"] = persistent + max(
        plan["KV cache (sampling)"], plan["gradients (update)"] + plan["activations (update)"]
    )
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
        parts = ", ".join(f"{key} {value:.1f}" for key, value in plan.items() if key != "peak")
        print(f"memory plan per rank, GiB: {parts}; peak {plan['peak']:.1f} of {capacity:.1f} ({where})", flush=True)
    if plan["peak"] > capacity:
        die(
            f"the memory plan ({plan['peak']:.1f} GiB per rank) exceeds {where} ({capacity:.1f} GiB): lower "
            "--generation_batch_size (KV cache), --micro_batch_size, or add --gradient_checkpointing (activations)"
        )


# ----------------------------------------------------------------------------- run directories and checkpoints
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoints(output_dir):
    """Paths of output_dir/checkpoint-<step>, oldest first; other folders (checkpoint-6.bak) are ignored."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = sorted(int(m.group(1)) for m in map(CHECKPOINT.fullmatch, names) if m)
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]


def check_output_dir(output_dir, resume, overwrite):
    """One run per output directory, checked before anything loads and without writing anything: it must be
    a writable directory (or creatable), hold no earlier run unless resume or overwrite, and not be in use by
    a running run. Returns the lock (the directory's descriptor) if the directory exists, else None."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        die(f"--output_dir {output_dir!r} is a file; pass a directory")
    parent = output_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.access(parent, os.W_OK):
        die(f"--output_dir {output_dir!r} is not writable; pass another directory")
    if not os.path.isdir(output_dir):
        return None
    lock = lock_directory(output_dir)
    earlier = checkpoints(output_dir) or os.path.exists(os.path.join(output_dir, "metrics.jsonl"))
    if earlier and not (resume or overwrite):
        die(
            f"--output_dir {output_dir!r} holds an earlier run; pass --resume to continue it, "
            "--overwrite_output_dir to replace it, or another directory"
        )
    return lock


def lock_directory(path):
    """An exclusive lock on the directory itself (nothing is left behind), held until the process ends."""
    import fcntl

    lock = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        die(f"--output_dir {path!r} is in use by another run; wait for it or pass another directory")
    return lock


def open_output_dir(output_dir, overwrite, lock):
    """Create and lock the output directory once everything has loaded; with overwrite, clear the old run."""
    os.makedirs(output_dir, exist_ok=True)
    lock = lock if lock is not None else lock_directory(output_dir)
    if overwrite:
        for path in checkpoints(output_dir):
            shutil.rmtree(path)
        with suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, "metrics.jsonl"))
    return lock


def resume_state(output_dir, device):
    """(checkpoint path, trainer state) of the newest readable checkpoint, or (None, None). An unreadable one
    (torn trainer_state.pt, missing or corrupt weights) is skipped with a message."""
    from safetensors import safe_open

    for path in reversed(checkpoints(output_dir)):
        try:
            state = torch.load(os.path.join(path, "trainer_state.pt"), map_location=device, weights_only=False)
            with safe_open(os.path.join(path, "model.safetensors"), "pt") as weights:
                for key in weights.keys():
                    weights.get_slice(key)
            return path, state
        except Exception as e:  # noqa: BLE001 - any failure to read means: not this checkpoint
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"warning: {path} is unreadable ({type(e).__name__}: {e}); trying the one before", flush=True)
    if checkpoints(output_dir):
        die(f"--resume: no readable checkpoint in {output_dir!r}; pass --overwrite_output_dir to start over")
    return None, None


def check_same_run(saved, current, may_change):
    """--resume continues the same run: every saved argument except those in may_change must be unchanged."""
    changed = [k for k in saved if k not in may_change and k in current and saved[k] != current[k]]
    if changed:
        diffs = ", ".join(f"--{k} {saved[k]!r} -> {current[k]!r}" for k in changed)
        die(f"--resume would make a different run ({diffs}); restore them or pass another --output_dir")


def all_finite(module):
    """True if no parameter holds NaN/inf (one reduction, one device sync)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in module.parameters()]).all())


def save_checkpoint(output_dir, lm, tokenizer, trainer_state, keep):
    """model + tokenizer (save_pretrained) and the trainer state (optimizer, scheduler, step, args), written
    to a temporary directory unique to this process and then renamed: a crash never leaves a half-written
    checkpoint-N, and an existing checkpoint-N is replaced only once its successor is complete. Keeps the
    newest `keep` checkpoints (0 = all). Weights holding NaN/inf are never written: the run stops instead."""
    step = trainer_state["step"]
    if not all_finite(lm):
        die(f"step {step}: the weights hold NaN/inf; no checkpoint written. Lower --learning_rate")
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp, old = (os.path.join(output_dir, f".{kind}-checkpoint-{step}-{os.getpid()}") for kind in ("tmp", "old"))
    lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    for path in checkpoints(output_dir)[:-keep] if keep else []:
        shutil.rmtree(path, ignore_errors=True)


def read_metrics(path):
    """The records of a metrics.jsonl; a torn last line (a crash mid-write) is dropped."""
    records = []
    for line in open(path) if os.path.exists(path) else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def restart_metrics(path, step):
    """Keep the records up to `step` (those after it will be redone), rewritten atomically."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)


TRAIN_KEYS = "self_certainty accuracy completion_length truncated_frac kl loss grad_norm lr".split()
LOG_KEYS = [f"train/{key}" for key in TRAIN_KEYS] + ["perf/sample_tokens_per_s", "perf/sample_s", "perf/update_s"]


def mann_whitney(x, y):
    """Mann-Whitney U of x (e.g. SC of correct answers) against y, two-sided p-value by the normal
    approximation with tie correction and continuity correction, rank-biserial r and AUROC = U / (n1 n2)."""
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        return None
    values = sorted((v, g) for g, vs in ((0, x), (1, y)) for v in vs)
    ranks, ties, i = {0: 0.0, 1: 0.0}, 0.0, 0
    while i < len(values):  # average ranks over runs of ties
        j = i
        while j < len(values) and values[j][0] == values[i][0]:
            j += 1
        for _, g in values[i:j]:
            ranks[g] += (i + j + 1) / 2
        ties += (j - i) ** 3 - (j - i)
        i = j
    n = n1 + n2
    u = ranks[0] - n1 * (n1 + 1) / 2
    mu, sigma = n1 * n2 / 2, math.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))))
    p = math.erfc(max(abs(u - mu) - 0.5, 0) / sigma / math.sqrt(2)) if sigma > 0 else 1.0
    auroc = u / (n1 * n2)
    return {"U": u, "p_value": p, "rank_biserial": 2 * auroc - 1, "auroc": auroc}


def repeated_ngram_frac(tokens, n=4):
    """Fraction of a completion's n-grams that already occurred earlier in it: 0 for fresh text, near 1 for a loop."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def gather(values):
    """Every rank's list, concatenated (a single process: the list itself)."""
    if not dist.is_initialized():
        return list(values)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(values))
    return [v for part in parts for v in part]


def step_metrics(step, rollouts, rewards, update, lr, has_gold, sample_s, update_s, num_generations):
    """The step's record for metrics.jsonl: means over all ranks' sequences. monitor/* watch for reward hacking
    and collapse: token entropy, repeated 4-grams, groups whose rewards are all equal (no learning signal)
    and, with gold answers, whether self-certainty still tells right from wrong (AUROC over the step's
    completions) and picks winners (accuracy of each group's most self-certain completion vs the mean)."""
    n = all_reduce(len(rollouts)).item()

    def mean(values):
        return all_reduce(float(sum(values))).item() / n

    certainty = [r.self_certainty for r in rollouts]  # always the policy's own
    lengths = [len(r.completion) for r in rollouts]
    groups = [rollouts[i : i + num_generations] for i in range(0, len(rollouts), num_generations)]
    record = {"step": step, "train/self_certainty": mean(certainty)}
    record["train/self_certainty_std"] = math.sqrt(max(mean(x * x for x in certainty) - mean(certainty) ** 2, 0.0))
    record.update({f"train/reward/{name}": mean(values.tolist()) for name, values in rewards.items()})
    if has_gold:
        record["train/accuracy"] = mean(r.correct for r in rollouts)
    record["train/completion_length"] = mean(lengths)
    record["train/completion_length_max"] = all_reduce(max(lengths), dist.ReduceOp.MAX).item()
    record["train/truncated_frac"] = mean(r.truncated for r in rollouts)
    record.update({f"train/{key}": value for key, value in update.items()})
    record["monitor/entropy"] = mean(r.entropy for r in rollouts)
    record["monitor/repeated_4gram_frac"] = mean(repeated_ngram_frac(r.completion) for r in rollouts)
    trained = torch.stack(list(rewards.values()), 1).view(len(groups), num_generations, -1)
    equal = (trained.amax(1) == trained.amin(1)).all(-1)  # every reward equal within the group
    record["monitor/equal_reward_groups"] = mean(equal.tolist()) * num_generations
    if has_gold:
        best = [max(g, key=lambda r: r.self_certainty).correct for g in groups]
        record["monitor/most_certain_accuracy"] = mean(best) * num_generations
        pairs = gather((r.self_certainty, r.correct) for r in rollouts)
        split = mann_whitney([sc for sc, ok in pairs if ok], [sc for sc, ok in pairs if not ok])
        record["monitor/certainty_auroc"] = split["auroc"] if split else float("nan")
    tokens_per_s = mean(lengths) * n / sample_s
    return record | {"train/lr": lr, "perf/sample_tokens_per_s": tokens_per_s, "perf/sample_s": sample_s,
                     "perf/update_s": update_s}  # fmt: skip


class HackingAlarm:
    """Watches the step records for the signatures of reward hacking (paper Fig. 7: length or repetition
    jumps while the reward rises and accuracy, when known, falls) and of entropy collapse, comparing the
    last `window` steps with the `window` before them. Sets monitor/alarm on every record (1 while a
    signature holds) and returns a one-line message when a signature first appears."""

    def __init__(self, window=5, length_jump=0.25, repetition_jump=0.1, accuracy_drop=0.05, entropy_floor=0.5):
        self.window, self.history = window, []
        self.length_jump, self.repetition_jump = length_jump, repetition_jump
        self.accuracy_drop, self.entropy_floor = accuracy_drop, entropy_floor

    def check(self, record):
        self.history.append(record)
        record["monitor/alarm"], w = 0, self.window
        if len(self.history) < 2 * w:
            return None
        before, last = self.history[-2 * w : -w], self.history[-w:]

        def change(key):
            values = [[r[key] for r in part if key in r and math.isfinite(r[key])] for part in (before, last)]
            return sum(values[1]) / len(values[1]) - sum(values[0]) / len(values[0]) if all(values) else None

        first = [r["monitor/entropy"] for r in self.history[:w]]
        signs = []
        rewards = [change(k) for k in record if k.startswith("train/reward/")]
        reward_up = any(d is not None and d > 0 for d in rewards)
        length_before = sum(r["train/completion_length"] for r in before) / w
        if change("train/completion_length") > self.length_jump * length_before:
            signs.append("completion length jumped")
        if change("monitor/repeated_4gram_frac") > self.repetition_jump:
            signs.append("repetition jumped")
        accuracy = change("train/accuracy")
        hacking = signs and reward_up and (accuracy is None or accuracy < -self.accuracy_drop)
        if hacking and accuracy is not None:
            signs.append(f"accuracy fell by {-accuracy:.3f}")
        collapse = sum(r["monitor/entropy"] for r in last) / w < self.entropy_floor * sum(first) / w
        if not (hacking or collapse):
            return None
        record["monitor/alarm"] = 1
        if self.history[-2]["monitor/alarm"]:
            return None  # still the same episode: flagged in the record, announced once
        why = ", ".join(signs) + " while the reward rose" if hacking else ""
        why += ("; " if why else "") + ("token entropy collapsed" if collapse else "")
        return f"ALARM step {record['step']}: {why} (reward hacking or collapse; read the completions)"


def make_logger(report_to, output_dir, config):
    """A tracker beside metrics.jsonl (which stays the source of truth): tensorboard or wandb, or None."""
    if report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            die("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
        writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

        def to_tensorboard(record):
            for key, value in record.items():
                if key != "step":
                    writer.add_scalar(key, value, record["step"])
            writer.flush()

        return to_tensorboard
    if report_to == "wandb":
        try:
            import wandb
        except ImportError:
            die("--report_to wandb needs the wandb package: pip install wandb (WANDB_MODE=offline works offline)")
        run = wandb.init(project="intuitor", dir=output_dir, config=config)

        def to_wandb(record):
            run.log({key: value for key, value in record.items() if key != "step"}, step=record["step"])

        return to_wandb
    return None


def progress_bars(rank=0):
    """Progress bars only on an interactive terminal (rank 0): in a log file their carriage returns garble lines."""
    import sys

    return rank == 0 and sys.stderr.isatty()


def log_step(path, record, max_steps, logger=None):
    """Append the step's record to metrics.jsonl (and the tracker), print its main numbers on one line."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if logger is not None:
        logger(record)
    shown = " | ".join(f"{key.split('/')[-1]} {record[key]:.4g}" for key in LOG_KEYS if key in record)
    print(f"step {record['step']}/{max_steps} | {shown}", flush=True)


def show_completion(tokenizer, rollout):
    text = tokenizer.decode(rollout.completion)[:1000]
    print(f"--- sample completion (self-certainty {rollout.self_certainty:.3f}) ---\n{text}\n---", flush=True)


# ----------------------------------------------------------------------------- flags and training curves
# Flags that --resume may change: they do not change what the run computes.
MAY_CHANGE_ON_RESUME = set(
    """max_steps save_steps save_total_limit resume overwrite_output_dir device output_dir
    log_completions_steps micro_batch_size chunk_size vocab_chunk_size gradient_checkpointing sampler
    sampling_weights""".split()
)


def check_train_args(args, world_size):
    """Every flag checked before anything loads; the first one out of range ends the run with one line."""
    a, inf = args, math.inf
    rules = [
        (a.num_generations >= 2, "--num_generations must be >= 2: advantages are normalised within a group"),
        (
            a.prompts_per_step >= 1 and a.prompts_per_step % world_size == 0,
            f"--prompts_per_step ({a.prompts_per_step}) must be a positive multiple of the world size ({world_size})",
        ),
        (
            a.generation_batch_size >= 0 and a.generation_batch_size % a.num_generations == 0,
            f"--generation_batch_size ({a.generation_batch_size}) must be a multiple of --num_generations (0 = all)",
        ),
        (0 < a.temperature < inf, "--temperature must be a number > 0 (GRPO needs distinct samples per group)"),
        (0 < a.learning_rate < inf, "--learning_rate must be a number > 0"),
        (0 <= a.beta < inf, "--beta must be a number >= 0 (0 skips the reference model)"),
        (0 <= a.epsilon < 1 and 0 <= a.epsilon_high < inf, "--epsilon must be in [0, 1), --epsilon_high >= 0"),
        (0 <= a.warmup_ratio <= 1, "--warmup_ratio must be in [0, 1]"),
        (0 < a.max_grad_norm <= inf and 0 <= a.weight_decay < inf, "--max_grad_norm must be > 0, --weight_decay >= 0"),
        (a.max_steps == -1 or a.max_steps >= 1, "--max_steps must be >= 1, or -1 for one epoch"),
        (a.device != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device here; pass --device cpu"),
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
    if a.resume and a.overwrite_output_dir:
        die("--resume and --overwrite_output_dir contradict each other; pass one")


def parse_reward(spec, rewards):
    """'--reward a=1,b=0.5' -> {'a': 1.0, 'b': 0.5}; a bare name weighs 1; names must be in `rewards`."""
    weights = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition("=")
        if name not in rewards:
            die(f"--reward: unknown reward {name!r}; choose from {', '.join(rewards)}")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            die(f"--reward: weight {weight!r} of {name} is not a number")
    return weights


def seed_step(seed, step, rank):
    """Every (step, rank) gets its own stream: ranks sample differently, and a resumed run samples as an
    uninterrupted one would."""
    s = (seed * 1_000_003 + step * 1009 + rank) % 2**63
    random.seed(s)
    torch.manual_seed(s)


def parse_flags(dataclass_type, argv, epilog=None):
    """Command-line flags into the dataclass; an unknown or malformed flag is one error line, not a traceback."""
    import argparse

    from transformers import HfArgumentParser

    class Help(argparse.ArgumentDefaultsHelpFormatter):  # no "(default: None)" after a required flag
        def _get_help_string(self, action):
            return action.help if action.default in (None, "") else super()._get_help_string(action)

    parser = HfArgumentParser(dataclass_type, formatter_class=Help, epilog=epilog)

    def usage_error(message):
        die(f"{message}; run with --help to list the flags")

    parser.error = usage_error
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        usage_error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


PANELS = [
    ("self-certainty", ["train/self_certainty", "train/reward/self_certainty"]),
    ("completion length (tokens)", ["train/completion_length", "train/completion_length_max"]),
    ("KL to initial model", ["train/kl"]),
    ("accuracy (monitor)", ["train/accuracy", "monitor/most_certain_accuracy"]),
    ("token entropy (nats)", ["monitor/entropy"]),
    ("repeated 4-grams", ["monitor/repeated_4gram_frac"]),
    ("self-certainty vs correct: AUROC", ["monitor/certainty_auroc"]),
]


PLOT_USAGE = "python intuitor.py plot RUN/metrics.jsonl [MORE/metrics.jsonl ...] [OUT.png] [--force]"


def tracked_by_git(path):
    import subprocess

    where = os.path.dirname(os.path.abspath(path))
    ls = subprocess.run(["git", "-C", where, "ls-files", "--error-unmatch", os.path.abspath(path)], capture_output=True)
    return ls.returncode == 0


def plot_metrics(*argv):
    """One PNG of training curves (paper Fig. 3 / Fig. 7): self-certainty, completion length, KL, accuracy.
    One run: every logged variant of each; several runs: one line per run, so methods can be compared. The
    default OUT is the first run's metrics.png; a file tracked by git is overwritten only with --force."""
    paths = [a for a in argv if a.endswith(".jsonl")]
    outs = [a for a in argv if a.endswith(".png")]
    if not paths or len(outs) > 1 or len(paths) + len(outs) + ("--force" in argv) != len(argv):
        print(f"usage: {PLOT_USAGE}")
        raise SystemExit(0 if set(argv) & {"-h", "--help"} else 2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        die("plotting needs matplotlib: pip install matplotlib")
    for path in paths:
        if not os.path.isfile(path):
            die(f"{path}: no such metrics file; pass a run's output_dir/metrics.jsonl ({PLOT_USAGE})")
    out = outs[0] if outs else os.path.splitext(paths[0])[0] + ".png"
    if os.path.exists(out) and "--force" not in argv and tracked_by_git(out):
        die(f"{out} is a file tracked by git; pass another OUT.png, or --force to overwrite it")
    runs = {os.path.basename(os.path.dirname(os.path.abspath(p))) or p: read_metrics(p) for p in paths}
    logged = [(title, [k for k in keys if any(k in r for rs in runs.values() for r in rs)]) for title, keys in PANELS]
    panels = [(title, keys if len(runs) == 1 else keys[:1]) for title, keys in logged if keys]
    rows, cols = (len(panels) + 3) // 4, min(len(panels), 4)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (title, keys) in zip(axes.flat, panels):
        for name, records in runs.items():
            for key in keys:
                online = all(abs(r[key] - r["train/self_certainty"]) < 1e-4 for r in records if key in r)
                if key == "train/reward/self_certainty" and online:
                    continue  # the reward is the policy's own SC, already drawn
                steps, values = [r["step"] for r in records if key in r], [r[key] for r in records if key in r]
                ax.plot(steps, values, label=key.split("/", 1)[1] if len(runs) == 1 else name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":  # python common.py arithmetic DIR: writes DIR/arithmetic_{train,test}.jsonl
    import sys

    if sys.argv[1:2] != ["arithmetic"] or len(sys.argv) != 3:
        die("usage: python common.py arithmetic OUTPUT_DIR")
    os.makedirs(sys.argv[2], exist_ok=True)
    for name, split in zip(("train", "test"), arithmetic_splits()):
        with open(os.path.join(sys.argv[2], f"arithmetic_{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in split)
        print(f"wrote {len(split)} problems to {os.path.join(sys.argv[2], f'arithmetic_{name}.jsonl')}")
