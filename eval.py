"""
GSM8K / MATH-500 accuracy of a checkpoint, self-certainty vs correctness (paper Fig. 8), and best-of-N
selection by self-certainty (arXiv 2502.18581).

    python eval.py --model runs/intuitor/checkpoint-50 --benchmark math500
    python eval.py --model PATH --benchmark gsm8k --data gsm8k_test.jsonl --limit 100 --max_new_tokens 256
    python eval.py --model PATH --benchmark math500 --n 8 --temperature 0.7        # best-of-8
    torchrun --nproc_per_node=8 eval.py --model PATH --benchmark math500           # sharded, gathered on rank 0

Prompting (chat template + system prompt) and decoding come from intuitor.py, so an answer's self-certainty
is the exact quantity the policy was trained on, free from the sampling loop. Greedy by default, as in the paper.
"""
import json
import math
import os
import re
import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

import intuitor

HUB = {"gsm8k": ("openai/gsm8k", "main", "question"), "math500": ("HuggingFaceH4/MATH-500", None, "problem")}


@dataclass
class EvalArgs:
    model: str = field(metadata={"help": "hub id, local directory or .gguf file"})
    benchmark: Literal["gsm8k", "math500"] = field(default="math500", metadata={"help": "which benchmark"})
    data: str = field(default="", metadata={"help": "local .jsonl/.parquet with the hub dataset's columns"})
    limit: int = field(default=0, metadata={"help": "first N problems only; 0 = all"})
    batch_size: int = field(default=16, metadata={"help": "problems sampled at once per rank"})
    max_new_tokens: int = field(default=3072, metadata={"help": "completion budget"})
    n: int = field(default=1, metadata={"help": "samples per problem; > 1 enables best-of-N selection"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    borda_p: float = field(default=0.5, metadata={"help": "exponent of self-certainty-weighted Borda voting"})
    system_prompt: str = field(default=intuitor.SYSTEM_PROMPT, metadata={"help": "as in training"})
    output: str = field(default="results.jsonl", metadata={"help": "per-problem records; the summary goes to *.summary.json"})
    seed: int = field(default=0, metadata={"help": "sampling seed (n > 1)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})


# ----------------------------------------------------------------------------- answers and grading
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
            return text[i + 1:j].strip()
    return None


def extract_answer(completion, benchmark):
    """The prediction: the last \\boxed{} answer, else (GSM8K only) the last number of the completion."""
    boxed = last_boxed(completion)
    if boxed is not None or benchmark != "gsm8k":
        return boxed
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", completion)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def gold_answer(row, benchmark):
    """GSM8K: the text after '####'; MATH: the `answer` column, else the last \\boxed{} of `solution`."""
    if benchmark == "gsm8k":
        return row["answer"].split("####")[-1].strip().replace(",", "")
    return row.get("answer") or last_boxed(row["solution"])


def is_correct(pred, gold):
    """Mathematical equivalence by math-verify (fractions vs decimals, LaTeX vs plain); no answer is wrong."""
    if pred is None or gold is None:
        return False
    from math_verify import parse, verify
    wrap = lambda s: s if "$" in s else f"${s}$"  # noqa: E731  (math-verify reads LaTeX in math mode)
    try:
        return bool(verify(parse(wrap(gold)), parse(wrap(pred))))
    except Exception:  # math-verify raises on some malformed LaTeX; count it as wrong
        return False


def gold_answers(rows, column):
    """Gold answers, only used by the `accuracy` reward and the accuracy monitor (INTUITOR never sees them):
    `--answer_column`, else `answer` (the text after '####' for GSM8K), else the last \\boxed{} of `solution`."""
    if column and column not in rows.column_names:
        intuitor.die(f"--answer_column {column!r} is not a column (columns: {', '.join(rows.column_names)})")
    column = column or next((c for c in ("answer", "solution") if c in rows.column_names), None)
    if column is None:
        return [None] * len(rows)
    parse = lambda v: (v.split("####")[-1].strip().replace(",", "") if "####" in v  # noqa: E731
                       else last_boxed(v) if column == "solution" else v.strip())
    return [parse(str(v)) for v in rows[column]]


# ----------------------------------------------------------------------------- statistics
def wilson_interval(k, n, z=1.96):
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


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


# ----------------------------------------------------------------------------- best-of-N selection
def answer_clusters(answers):
    """Group equivalent answers (math-verify), so '0.5' and '\\frac12' vote together; None never clusters."""
    reps = []
    labels = []
    for a in answers:
        if a is None:
            labels.append(None)
            continue
        match = next((k for k, r in enumerate(reps) if a == r or is_correct(a, r)), None)
        if match is None:
            reps.append(a)
            match = len(reps) - 1
        labels.append(match)
    return labels


def select(answers, certainties, p=0.5):
    """Indices chosen among N samples by: highest self-certainty; majority vote over extracted answers;
    self-certainty-weighted Borda voting (sample of SC rank r scores (N - r + 1)^p for its answer).
    Ties go to the answer whose best sample has the higher self-certainty; no answer never wins a vote."""
    n = len(answers)
    order = sorted(range(n), key=lambda i: -certainties[i])
    labels = answer_clusters(answers)
    votes, borda = Counter(), Counter()
    for rank, i in enumerate(order, start=1):
        if labels[i] is not None:
            votes[labels[i]] += 1
            borda[labels[i]] += (n - rank + 1) ** p
    first = {labels[i]: i for i in reversed(order)}  # each answer's most certain sample

    def winner(scores):
        if not scores:
            return order[0]
        return first[max(scores, key=lambda c: (scores[c], certainties[first[c]]))]
    return {"self_certainty": order[0], "majority": winner(votes), "borda": winner(borda)}


def plurality_votes(answers):
    """GRPO-PV: 1 for answers equal (by math-verify) to the group's most common extracted answer; ties go to
    the answer seen first, no answer scores 0."""
    labels = answer_clusters(answers)
    counts = Counter(label for label in labels if label is not None)
    top = max(counts, key=lambda c: (counts[c], -c)) if counts else None
    return [float(label is not None and label == top) for label in labels]


# ----------------------------------------------------------------------------- training curves
def plot_metrics(path, out=None):
    """One PNG of a run's curves (paper Fig. 3 / Fig. 7): self-certainty, completion length, KL, accuracy."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        intuitor.die("plotting needs matplotlib: pip install matplotlib")
    if not os.path.isfile(path):
        intuitor.die(f"{path}: no such metrics file; pass a run's output_dir/metrics.jsonl")
    recs = [json.loads(line) for line in open(path)]
    panels = [("self-certainty", ["train/self_certainty", "train/reward/self_certainty"]),
              ("completion length (tokens)", ["train/completion_length", "train/completion_length_max"]),
              ("KL to initial model", ["train/kl"]), ("accuracy (monitor)", ["train/accuracy"])]
    panels = [(t, [k for k in keys if any(k in r for r in recs)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            if k == "train/reward/self_certainty" and all(abs(r[k] - r["train/self_certainty"]) < 1e-4 for r in recs):
                continue  # online: the reward is the policy's own SC, already drawn
            ax.plot([r["step"] for r in recs if k in r], [r[k] for r in recs if k in r], label=k.split("/", 1)[1])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = out or os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return out


# ----------------------------------------------------------------------------- main
def load_problems(a):
    name, config, column = HUB[a.benchmark]
    if a.data:
        rows = intuitor.load_rows(a.data, "test")
    else:
        from datasets import load_dataset
        try:
            rows = load_dataset(name, config, split="test")
        except (OSError, ValueError, ConnectionError) as e:
            intuitor.die(f"cannot load {name} ({str(e).splitlines()[0]}); pass a local file with --data")
    if column not in rows.column_names:
        intuitor.die(f"--data has no column {column!r} (columns: {', '.join(rows.column_names)}) for --benchmark {a.benchmark}")
    rows = [dict(r, question=r[column]) for r in rows]
    return rows[:a.limit] if a.limit else rows


def summarize(records, a):
    n = len(records)
    samples = [s for r in records for s in (r["samples"] if a.n > 1 else [r])]
    k = sum(s["correct"] for s in samples)  # with n > 1: the accuracy of a single sample
    mean = lambda xs: sum(xs) / max(len(samples), 1)  # noqa: E731  (over all samples)
    out = {"benchmark": a.benchmark, "model": a.model, "n_problems": n, "samples_per_problem": a.n,
           "accuracy": mean([s["correct"] for s in samples]), "accuracy_ci95": wilson_interval(k, len(samples)),
           "mean_length": mean([s["length"] for s in samples]),
           "truncated_frac": mean([s["truncated"] for s in samples]),
           "boxed_frac": mean([last_boxed(s["completion"]) is not None for s in samples]),
           "mean_self_certainty": mean([s["self_certainty"] for s in samples])}
    right = [s["self_certainty"] for s in samples if s["correct"]]
    wrong = [s["self_certainty"] for s in samples if not s["correct"]]
    out["self_certainty_vs_correctness"] = {
        "mean_correct": sum(right) / len(right) if right else None,
        "mean_incorrect": sum(wrong) / len(wrong) if wrong else None, **(mann_whitney(right, wrong) or {})}
    if a.n > 1:
        for rule in ("self_certainty", "majority", "borda"):
            out[f"best_of_n/{rule}"] = sum(r["selected"][rule]["correct"] for r in records) / n
        out["best_of_n/pass@n"] = sum(any(s["correct"] for s in r["samples"]) for r in records) / n
    if a.benchmark == "math500":
        for key in ("subject", "level"):
            groups = {}
            for r in records:
                groups.setdefault(str(r.get(key)), []).append(r["correct"])
            out[f"accuracy_by_{key}"] = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
    return out


def main(argv=None):
    from transformers import HfArgumentParser
    a = HfArgumentParser(EvalArgs).parse_args_into_dataclasses(args=argv)[0]
    if a.n < 1 or a.batch_size < 1 or a.max_new_tokens < 1:
        intuitor.die("--n, --batch_size and --max_new_tokens must be >= 1")
    if a.n > 1 and a.temperature <= 0:
        intuitor.die("--n > 1 needs --temperature > 0, or all samples are the same greedy answer")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    rows = load_problems(a)
    lm, tok = intuitor.load_model(a.model, device)
    lm.eval()
    stop = intuitor.stop_token_ids(tok, lm)
    mine = list(range(rank, len(rows), world))
    records = []
    torch.manual_seed(a.seed + rank)
    for i in tqdm(range(0, len(mine), a.batch_size), disable=rank != 0, desc=f"{a.benchmark} (rank 0 of {world})"):
        idx = mine[i:i + a.batch_size]
        prompts = [tok(intuitor.render_prompt(tok, rows[j]["question"], a.system_prompt), add_special_tokens=False).input_ids for j in idx]
        with torch.autocast(device.type, dtype=torch.bfloat16) if cuda else nullcontext():
            outs = intuitor.sample(lm, prompts, a.n, a.max_new_tokens, a.temperature, stop, tok.pad_token_id)
        for k, j in enumerate(idx):
            gold = gold_answer(rows[j], a.benchmark)
            samples = []
            for o in outs[k * a.n:(k + 1) * a.n]:
                text = tok.decode(o["completion"], skip_special_tokens=True)
                pred = extract_answer(text, a.benchmark)
                samples.append({"completion": text, "extracted": pred, "correct": is_correct(pred, gold),
                                "self_certainty": o["self_certainty"], "length": len(o["completion"]), "truncated": o["truncated"]})
            rec = {"index": j, "problem": rows[j]["question"], "gold": gold,
                   **{key: rows[j][key] for key in ("subject", "level") if key in rows[j]}}
            if a.n == 1:
                rec.update(samples[0])
            else:
                chosen = select([s["extracted"] for s in samples], [s["self_certainty"] for s in samples], a.borda_p)
                rec.update(samples=samples, selected={rule: {"index": c, "correct": samples[c]["correct"]} for rule, c in chosen.items()},
                           correct=samples[chosen["self_certainty"]]["correct"])
            records.append(rec)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
        dist.destroy_process_group()
    if rank != 0:
        return
    records.sort(key=lambda r: r["index"])
    summary = summarize(records, a)
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    with open(a.output, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.splitext(a.output)[0] + ".summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
