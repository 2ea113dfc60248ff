"""
Table 1's benchmarks for a checkpoint: math (GSM8K, MATH-500), code graded by running it (LiveCodeBench,
HumanEval, MBPP), CRUXEval-O and MMLU-Pro; self-certainty vs correctness (paper Fig. 8); pass@k; best-of-N
selection by self-certainty (arXiv 2502.18581).

    python eval.py --model runs/intuitor/checkpoint-50 --benchmark math500
    python eval.py --model PATH --benchmark gsm8k --data gsm8k_test.jsonl --limit 100 --max_new_tokens 256
    python eval.py --model PATH --benchmark math500 --num_samples 8 --temperature 0.7  # best-of-8
    python eval.py --model PATH --benchmark humaneval --num_samples 10 --temperature 0.8  # pass@1 ... pass@10
    torchrun --nproc_per_node=8 eval.py --model PATH --benchmark math500           # sharded, gathered on rank 0
    python eval.py compare BASE.jsonl RUN.jsonl ...                                 # paired table of evaluations

Prompting (chat template), stop tokens and decoding come from intuitor.py, so an answer's self-certainty is the
exact quantity the policy was trained on; math answers are graded by intuitor_harness/tasks.py, as the training rewards
are; programs run in intuitor_harness/sandbox.py. Greedy by default, as in the paper.
"""

import fcntl
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm import tqdm

import intuitor
from intuitor_harness import process, runs, sandbox
from intuitor_harness.benchmarks import BENCHMARKS, FAILURES, NEUTRAL_SYSTEM_PROMPT, grade_batch, load_problems
from intuitor_harness.process import die
from intuitor_harness.tasks import answer_clusters, last_boxed, plurality_winner
from intuitor_harness.watch import mann_whitney, progress_bars, quiet_libraries


@dataclass
class EvalArgs:
    model: str = field(metadata={"help": "hub id, local directory or .gguf file"})
    benchmark: Literal[tuple(BENCHMARKS)] = field(default="math500", metadata={"help": "see README, Benchmarks"})
    data: str = field(default="", metadata={"help": "local .jsonl/.parquet with the hub dataset's columns"})
    limit: int = field(default=0, metadata={"help": "first N problems only; 0 = all"})
    batch_size: int = field(default=16, metadata={"help": "problems sampled at once per rank"})
    max_new_tokens: int = field(default=3072, metadata={"help": "completion budget"})
    num_samples: int = field(
        default=1,
        metadata={"help": "samples per problem; > 1 enables best-of-N selection (also --n, not under torchrun)",
                  "aliases": ["--n"]},
    )  # fmt: skip
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    borda_p: float = field(default=0.5, metadata={"help": "exponent of self-certainty-weighted Borda voting"})
    system_prompt: str = field(
        default="", metadata={"help": "empty = the training prompt for math benchmarks, a neutral one for the others"}
    )
    prompt_format: Literal["chat", "plain"] = field(
        default="chat",
        metadata={"help": "as intuitor.py's --prompt_format: evaluate in the format the model was trained in"},
    )
    output: str = field(
        default="",
        metadata={
            "help": "per-problem records (default runs/eval/BENCHMARK.jsonl); "
            "the summary goes beside it, *.summary.json"
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier result at --output"})
    seed: int = field(default=0, metadata={"help": "sampling seed (n > 1)"})
    timeout: float = field(default=10.0, metadata={"help": "seconds per program run (code benchmarks, CRUXEval)"})
    grading_workers: int = field(default=0, metadata={"help": "programs run at once; 0 = one per CPU core"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto = cuda when available"})


# ----------------------------------------------------------------------------- statistics
def wilson_interval(k, n, z=1.96):
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(centre - half, 0.0), min(centre + half, 1.0))  # rounding must not leave [0, 1]


def mcnemar_exact(before, after):
    """Paired test of correctness on the same problems (McNemar, exact): b problems right only before, c right
    only after; two-sided p = P(Bin(b + c, 1/2) at least as far from (b + c) / 2 as observed)."""
    b = sum(x and not y for x, y in zip(before, after))
    c = sum(y and not x for x, y in zip(before, after))
    tail = sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c)
    return {"only_before": b, "only_after": c, "p_value": min(1.0, 2 * tail)}


COMPARE_USAGE = "and: python eval.py compare BASE.jsonl [RUN.jsonl ...] (a paired table of evaluations)"


def read_records(path):
    """eval.py's per-problem records, each checked: one error line for anything else."""
    try:
        records = [json.loads(line) for line in open(path, encoding="utf-8")]
        if not records or not all(isinstance(r, dict) and "index" in r and "correct" in r for r in records):
            raise ValueError("no per-problem records")
        return records
    except (OSError, UnicodeDecodeError, ValueError) as e:
        die(f"{path}: not per-problem records written by eval.py ({type(e).__name__}); pass eval.py's --output file")


def output_path(args):
    """Where the records go, checked and claimed before any model loads: a file path whose folder can be made,
    and no earlier result there unless --overwrite (evaluating two models with the default path would otherwise
    keep only the second)."""
    output = args.output or os.path.join("runs", "eval", model_label(args.model), f"{args.benchmark}.jsonl")
    summary = summary_path(output)
    if os.path.isdir(output) or output.endswith(os.sep):
        die(f"--output {output!r} is a directory; pass a file path such as {os.path.join(output, 'eval.jsonl')!r}")
    if not output.endswith(".jsonl"):  # the summary is named from it: a.jsonl and a.json would share a.summary.json
        die(f"--output {output!r} must end with .jsonl (its summary goes beside it as *.summary.json)")
    earlier = any(os.path.isfile(path) and os.path.getsize(path) for path in (output, summary))  # empty: claimed
    if earlier and not args.overwrite:
        die(f"--output {output!r} holds an earlier result (of {earlier_model(summary) or 'an earlier evaluation'}); "
            "pass another --output, or --overwrite to replace it")  # fmt: skip
    folder = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(folder, exist_ok=True)
        claim = open(output, "a")  # claimed: writable, and a later --output here needs --overwrite
    except OSError as e:
        die(f"--output {output!r} cannot be written ({e.strerror}); pass another path")
    try:  # held until this process ends: a second evaluation on the same path is refused, not mixed in
        fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        die(f"--output {output!r} is being written by another evaluation; wait for it to end or pass another --output")
    CLAIMS.append(claim)
    return output


CLAIMS = []  # the open, locked --output files of this process


def model_label(model):
    """A folder name for --model's default --output: runs/eval/LABEL/BENCHMARK.jsonl, so that two models'
    evaluations never share a file. A checkpoint is named with its run (intuitor-checkpoint-40), a .gguf file
    by its name, a hub id with -- for / (Qwen--Qwen2.5-1.5B)."""
    path = os.path.normpath(model)
    name = os.path.basename(path)
    if name.startswith("checkpoint-"):
        name = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}-{name}"
    elif name.endswith(".gguf"):
        name = name[: -len(".gguf")]
    elif not os.path.exists(model):
        name = model.replace("/", "--")
    return name


def summary_path(records_path):
    return os.path.splitext(records_path)[0] + ".summary.json"


def earlier_model(summary):
    try:
        with open(summary, encoding="utf-8") as f:
            return json.load(f).get("model")
    except (OSError, ValueError, AttributeError):
        return None


def read_summary(path):
    """The summary eval.py wrote beside a records file; one error line when it is missing or unreadable."""
    summary = summary_path(path)
    try:
        with open(summary, encoding="utf-8") as f:
            s = json.load(f)
        if not isinstance(s, dict) or "benchmark" not in s:
            raise ValueError("no benchmark named")
        return s
    except FileNotFoundError:
        die(f"{summary} is missing: compare reads the summary eval.py writes beside {path}; rerun that evaluation")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        die(f"{summary}: not a summary written by eval.py ({type(e).__name__}); rerun that evaluation")


def compare(paths):
    """python eval.py compare BASE.jsonl RUN.jsonl ...: one markdown row per evaluation (eval.py's per-problem
    records and their summaries), each paired against the first on the same problems: the same benchmark,
    the same problem count and the same problems (index and text), else one error line."""
    if len(paths) < 1 or not all(os.path.isfile(p) for p in paths):
        die("usage: python eval.py compare BASE.jsonl [RUN.jsonl ...] (per-problem records written by eval.py)")
    every_records = [read_records(path) for path in paths]  # each file checked as records, then its summary
    summaries = [read_summary(path) for path in paths]
    base, base_summary = every_records[0], summaries[0]
    labels = [s.get("model") or path for s, path in zip(summaries, paths)]  # each side by its model
    if len(set(labels)) < len(labels):  # one model evaluated twice: its file tells them apart
        labels = [f"{label} ({os.path.basename(path)})" if s.get("model") else label
                  for label, s, path in zip(labels, summaries, paths)]  # fmt: skip
    print(
        "| model | accuracy [95% CI] | mean length | truncated | mean SC | SC-correct AUROC (p) | vs base: b / c, p |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, path in enumerate(paths):
        records, s = every_records[i], summaries[i]
        if s["benchmark"] != base_summary["benchmark"]:
            die(f"{path} is {s['benchmark']}, {paths[0]} is {base_summary['benchmark']}; compare one benchmark")
        if len(records) != len(base):
            die(f"{path} holds {len(records)} problems, {paths[0]} {len(base)}; compare evaluations of the same ones")
        if [(r["index"], r.get("problem")) for r in records] != [(r["index"], r.get("problem")) for r in base]:
            die(f"{path} and {paths[0]} hold different problems; compare evaluations of the same problems")
        sc = s["self_certainty_vs_correctness"]
        test = mcnemar_exact([r["correct"] for r in base], [r["correct"] for r in records])
        lo, hi = s["accuracy_ci95"]
        auroc = f"{sc['auroc']:.2f} ({sc['p_value']:.2g})" if "auroc" in sc else "-"
        paired = "-" if i == 0 else f"{test['only_before']} / {test['only_after']}, {test['p_value']:.2g}"
        print(
            f"| {labels[i]} | {s['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {s['mean_length']:.1f} | "
            f"{s['truncated_frac']:.2f} | {s['mean_self_certainty']:.2f} | {auroc} | {paired} |"
        )


# ----------------------------------------------------------------------------- best-of-N selection
def select(labels, certainties, p=0.5):
    """Indices chosen among N samples by: highest self-certainty; majority vote over answers (equal labels
    are the same answer); self-certainty-weighted Borda voting (sample of SC rank r scores (N - r + 1)^p for
    its answer). Votes follow tasks.plurality_winner (ties: the answer sampled first); the chosen index is the
    winning answer's most certain sample; no answer (label None) never wins a vote, and with nothing to vote on
    the most certain sample is chosen. labels None (programs, which cannot be compared): self-certainty only."""
    n = len(certainties)
    order = sorted(range(n), key=lambda i: -certainties[i])
    if labels is None:
        return {"self_certainty": order[0]}
    borda = [0.0] * n
    for rank, i in enumerate(order, start=1):
        borda[i] = (n - rank + 1) ** p
    most_certain = {labels[i]: i for i in reversed(order)}  # each answer's most certain sample

    def chosen(winner):
        return order[0] if winner is None else most_certain[winner]

    majority, by_borda = plurality_winner(labels), plurality_winner(labels, borda)
    return {"self_certainty": order[0], "majority": chosen(majority), "borda": chosen(by_borda)}


# ----------------------------------------------------------------------------- problems and records
def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), the chance that k of the n samples,
    drawn without replacement, hold at least one of the c correct ones."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sample_records(outputs, texts, graded, code):
    """One record per sampled completion: text, extracted answer, correctness, self-certainty, length; for
    programs (and CRUXEval-O) why a failed one failed."""
    records = []
    for rollout, text, g in zip(outputs, texts, graded):
        record = {"completion": text, "extracted": g.answer, "correct": g.correct,
                  "self_certainty": rollout.self_certainty, "length": len(rollout.completion),
                  "truncated": rollout.truncated}  # fmt: skip
        records.append(record | ({"failure": g.failure} if code else {}))
    return records


# ----------------------------------------------------------------------------- records and summary
def problem_record(index, problem, samples, args):
    """A problem's record: its greedy sample's fields, or with several samples each rule's choice."""
    spec = BENCHMARKS[args.benchmark]
    keys = ("task_id", "question_id", "id", *spec.groups)
    record = {"index": index, "problem": problem["question"], "gold": problem["gold"]}
    record.update({key: problem[key] for key in keys if key in problem})
    if len(samples) == 1:
        record.update(samples[0])
        return record
    answers = [s["extracted"] for s in samples]
    if spec.grade == "code":  # programs cannot be compared: self-certainty alone chooses
        labels = None
    else:  # equal labels vote together: equivalent math answers, the same letter or value
        labels = answer_clusters(answers) if spec.grade == "math" else answers
    chosen = select(labels, [s["self_certainty"] for s in samples], args.borda_p)
    record.update(
        samples=samples,
        correct=samples[chosen["self_certainty"]]["correct"],
        selected={rule: {"index": c, "correct": samples[c]["correct"]} for rule, c in chosen.items()},
    )
    return record


def prompt_name(system_prompt):
    """The system prompt, recorded once by name: the training one, the neutral one, or a hash of another."""
    named = {intuitor.SYSTEM_PROMPT: "training (intuitor.SYSTEM_PROMPT)", NEUTRAL_SYSTEM_PROMPT: "neutral"}
    return named.get(system_prompt) or "custom, sha256 " + hashlib.sha256(system_prompt.encode()).hexdigest()[:16]


def summarize(records, args, system_prompt):
    n = len(records)
    samples = [s for r in records for s in (r["samples"] if args.num_samples > 1 else [r])]

    def mean(values):  # over all samples: with n > 1, the accuracy of a single sample
        return sum(values) / max(len(samples), 1)

    k = sum(s["correct"] for s in samples)
    out = {
        "benchmark": args.benchmark,
        "model": args.model,
        "n_problems": n,
        "samples_per_problem": args.num_samples,
        "accuracy": mean([s["correct"] for s in samples]),
        "accuracy_ci95": wilson_interval(k, len(samples)),
        "mean_length": mean([s["length"] for s in samples]),
        "truncated_frac": mean([s["truncated"] for s in samples]),
        "answer_found_frac": mean([s["extracted"] is not None for s in samples]),  # a box, a code block, a letter
        "mean_self_certainty": mean([s["self_certainty"] for s in samples]),
        "system_prompt": prompt_name(system_prompt),
        "prompt_format": args.prompt_format,
    }
    grade = BENCHMARKS[args.benchmark].grade
    if grade == "math":
        out["boxed_frac"] = mean([last_boxed(s["completion"]) is not None for s in samples])
    if grade in ("code", "output"):
        out["failures"] = {why: sum(s["failure"] == why for s in samples) for why in FAILURES}
        out["isolation"] = sandbox.isolation()  # bubblewrap, or plain processes (the fallback)
    right = [s["self_certainty"] for s in samples if s["correct"]]
    wrong = [s["self_certainty"] for s in samples if not s["correct"]]
    out["self_certainty_vs_correctness"] = {
        "mean_correct": sum(right) / len(right) if right else None,
        "mean_incorrect": sum(wrong) / len(wrong) if wrong else None,
        **(mann_whitney(right, wrong) or {}),
    }
    if args.num_samples > 1:
        for rule in records[0]["selected"]:
            out[f"best_of_n/{rule}"] = sum(r["selected"][rule]["correct"] for r in records) / n
        out["best_of_n/pass@n"] = sum(any(s["correct"] for s in r["samples"]) for r in records) / n
        for k in sorted(
            {2**e for e in range(args.num_samples.bit_length()) if 2**e <= args.num_samples} | {args.num_samples}
        ):
            out[f"pass@{k}"] = (
                sum(pass_at_k(args.num_samples, sum(s["correct"] for s in r["samples"]), k) for r in records) / n
            )
    for key in BENCHMARKS[args.benchmark].groups:
        groups = {}
        for r in records:
            groups.setdefault(str(r.get(key)), []).append(r["correct"])
        out[f"accuracy_by_{key}"] = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    args = process.parse_flags(EvalArgs, argv, epilog=COMPARE_USAGE)
    if not args.model:
        die("--model is empty: pass a hub id, a local model directory or a .gguf file")
    if args.num_samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1 or args.limit < 0:
        die("--num_samples, --batch_size and --max_new_tokens must be >= 1, --limit >= 0 (0 = all)")
    if not 0 <= args.temperature < math.inf or (args.num_samples > 1 and args.temperature == 0):
        die("--temperature must be >= 0, and > 0 with --num_samples > 1 (else all samples are the same greedy answer)")
    if not 0 < args.timeout < math.inf or args.grading_workers < 0:
        die("--timeout must be a positive number of seconds, --grading_workers >= 0 (0 = one per CPU core)")
    process.check_device(args.device)
    return args


def main(argv=None):
    quiet_libraries()  # a log file holds one line per batch
    args = parse_args(argv)
    rt = process.runtime_from_env(args.device)
    process.init_distributed(rt)
    problems = load_problems(args.benchmark, args.data, args.limit)
    output = process.on_first_rank(lambda: output_path(args))  # before the model loads and anything is sampled
    if BENCHMARKS[args.benchmark].grade in ("code", "output"):
        sandbox.self_test(args.timeout)  # a grader that cannot run programs ends here, not as accuracy 0
    policy, tokenizer = process.load_model(args.model, rt.device)
    policy.eval()
    stop_ids, pad_id = intuitor.stop_token_ids(tokenizer, policy), tokenizer.pad_token_id
    system_prompt = args.system_prompt or (
        intuitor.SYSTEM_PROMPT if BENCHMARKS[args.benchmark].grade == "math" else NEUTRAL_SYSTEM_PROMPT
    )
    mine = list(range(rt.rank, len(problems), rt.world_size))
    records = []
    torch.manual_seed(args.seed + rt.rank)
    progress = tqdm(total=len(mine), unit="problem", disable=not progress_bars(rt.rank), desc=args.benchmark)
    for i in range(0, len(mine), args.batch_size):
        indices = mine[i : i + args.batch_size]
        questions = [problems[j]["question"] for j in indices]
        prompts = [intuitor.tokenize_prompt(tokenizer, q, system_prompt, args.prompt_format) for q in questions]
        with rt.autocast():
            outputs = intuitor.sample(
                policy, prompts, args.num_samples, args.max_new_tokens, args.temperature, stop_ids, pad_id
            )
        if args.prompt_format == "plain":
            intuitor.cut_at_stop(outputs, tokenizer, intuitor.PLAIN_STOP)
        texts = [tokenizer.decode(rollout.completion, skip_special_tokens=True) for rollout in outputs]
        per_problem = [texts[k * args.num_samples : (k + 1) * args.num_samples] for k in range(len(indices))]
        problems_here = [problems[j] for j in indices]
        graded = grade_batch(args.benchmark, problems_here, per_problem, args.timeout, args.grading_workers)
        for k, j in enumerate(indices):
            code = BENCHMARKS[args.benchmark].grade in ("code", "output")
            samples = sample_records(
                outputs[k * args.num_samples : (k + 1) * args.num_samples], per_problem[k], graded[k], code
            )
            records.append(problem_record(j, problems[j], samples, args))
        progress.update(len(indices))
        if progress.disable and rt.rank == 0:  # a redirected log shows life once per batch
            print(f"{args.benchmark}: {min(i + args.batch_size, len(mine))} / {len(mine)} problems", flush=True)
    progress.close()  # before anything else is printed: no bar redrawn after the result
    records = process.gather(records)
    process.leave_process_group(rt)
    if rt.rank != 0:
        return
    records.sort(key=lambda r: r["index"])
    summary = summarize(records, args, system_prompt)
    # whole files or none (temporary file, fsync, rename): a full disk leaves the claimed, empty --output
    runs.atomic_write(output, "".join(json.dumps(r) + "\n" for r in records), "nothing was written; free space and "
                      "run the same command again")  # fmt: skip
    runs.atomic_write(summary_path(output), json.dumps(summary, indent=2),
                      f"{output} holds the records; free space and run the same command with --overwrite")  # fmt: skip
    print(result_line(summary, output), flush=True)


def result_line(summary, output):
    """'math500: accuracy 0.412 [0.369, 0.456], 500 problems; records runs/eval/m/math500.jsonl, summary ...'."""
    lo, hi = summary["accuracy_ci95"]
    each = f" x {summary['samples_per_problem']} samples" if summary["samples_per_problem"] > 1 else ""
    return (f"{summary['benchmark']}: accuracy {summary['accuracy']:.3f} [95% CI {lo:.3f}, {hi:.3f}], "
            f"{summary['n_problems']} problems{each}; records {output}, summary {summary_path(output)}")  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["compare"]:
        quiet_libraries()  # also: a closed pipe (| head) ends nothing with a traceback
        compare(sys.argv[2:])
    else:
        runs.interrupt_once()
        try:
            main(sys.argv[1:])
        except KeyboardInterrupt:  # Ctrl-C: records are written only once every problem is graded
            if int(os.environ.get("RANK", 0)) == 0:
                print("interrupted: no records were written (eval.py writes them when every problem is graded); "
                      "run the same command again", file=sys.stderr)  # fmt: skip
            raise SystemExit(130) from None
