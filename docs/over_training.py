"""The over-training records (docs/over_training/, written by docs/over_training.sh) as README tables and one figure.

    python docs/over_training.py [docs/over_training] [--plot OUT.png]

Reads each run's training records, NAME.metrics.jsonl (or NAME/metrics.jsonl, as docs/over_training.sh leaves
them in runs/over_training/), and its held-out evaluations, NAME.stepN.eval.jsonl + .summary.json; step 0 is the
base model's evaluation, docs/table1/base.eval.jsonl. Prints, as markdown:
  1. held-out accuracy at every evaluated step, per run;
  2. Table 1 over seeds: per seed the accuracy and its paired (McNemar) p against the base, then mean ± SD;
  3. every evaluated checkpoint of the seed-42 runs: paired p, mean self-certainty, its AUROC, mean length;
  4. training metrics averaged over steps 1-10, 11-20, 21-30, 31-40 (length, repetition, entropy, KL, the
     policy's own self-certainty and the reward's, which is the frozen reference's in the offline run);
  5. wall times of training and of each evaluation, from the /usr/bin/time lines in the kept logs.
Only records that exist are shown, so it can be run while the runs are still going.
"""

import glob
import json
import math
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from eval import mcnemar_exact, read_records  # noqa: E402
from intuitor_harness.runs import read_metrics  # noqa: E402

BASE = os.path.join(ROOT, "docs", "table1", "base.eval.jsonl")
SEEDS = {"grpo": ["grpo", "grpo_seed43", "grpo_seed44"], "intuitor": ["intuitor", "intuitor_seed43", "intuitor_seed44"]}
ORDER = [
    "grpo",
    "grpo_seed43",
    "grpo_seed44",
    "intuitor",
    "intuitor_seed43",
    "intuitor_seed44",
    "offline",
    "intuitor_lr1e-5",
    "intuitor_beta0.1",
    "token_sc",
    "mean_logprob",
    "answer_sc",
    "plain_grpo",
    "plain_grpo_seed43",
    "plain_grpo_seed44",
    "plain_intuitor",
    "plain_intuitor_seed43",
    "plain_intuitor_seed44",
]
PLAIN_SEEDS = {"plain_grpo": ["plain_grpo", "plain_grpo_seed43", "plain_grpo_seed44"],
               "plain_intuitor": ["plain_intuitor", "plain_intuitor_seed43", "plain_intuitor_seed44"]}  # fmt: skip


def evaluation(path):
    """(per-problem correctness, summary) of one eval.py output."""
    summary = json.load(open(os.path.splitext(path)[0] + ".summary.json"))
    return [r["correct"] for r in read_records(path)], summary


def collect(folder):
    """{run: {"evals": {step: (correct, summary)}, "metrics": [records]}} for every run with records. Step 0 is
    the base model in the run's own prompt format: plain_* runs (--prompt_format plain) start from
    plain_base.eval.jsonl in `folder`, the others from docs/table1/base.eval.jsonl."""
    base = evaluation(BASE)
    plain = os.path.join(folder, "plain_base.eval.jsonl")
    plain_base = evaluation(plain) if os.path.isfile(plain) else None
    runs = {}
    for path in glob.glob(os.path.join(folder, "*.step*.eval.jsonl")):
        name, step = re.fullmatch(r"(.+)\.step(\d+)\.eval\.jsonl", os.path.basename(path)).groups()
        start = plain_base if name.startswith("plain_") else base
        runs.setdefault(name, {"evals": {0: start}, "metrics": []})["evals"][int(step)] = evaluation(path)
    for name, run in runs.items():
        kept, live = os.path.join(folder, f"{name}.metrics.jsonl"), os.path.join(folder, name, "metrics.jsonl")
        run["metrics"] = next((read_metrics(p) for p in (kept, live) if os.path.isfile(p)), [])
    return dict(sorted(runs.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER)))


def accuracy_table(runs):
    steps = sorted({s for run in runs.values() for s in run["evals"]})
    print("| run | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for name, run in runs.items():
        cells = [f"{run['evals'][s][1]['accuracy']:.3f}" if s in run["evals"] else "" for s in steps]
        print(f"| {name} | " + " | ".join(cells) + " |")


def detail_table(runs, names):
    print("| run | step | held-out accuracy | vs base: b / c, p | mean SC | SC vs correct AUROC | mean length |")
    print("|---|---|---|---|---|---|---|")
    base = runs[names[0]]["evals"][0][0]
    for name in names:
        for step, (correct, s) in sorted(runs[name]["evals"].items()):
            test = mcnemar_exact(base, correct)
            paired = "" if step == 0 else f"{test['only_before']} / {test['only_after']}, {test['p_value']:.2g}"
            auroc = s["self_certainty_vs_correctness"].get("auroc")
            auroc = "–" if auroc is None else f"{auroc:.2f}"  # no right answer: undefined
            print(
                f"| {name} | {step} | {s['accuracy']:.3f} | {paired} | {s['mean_self_certainty']:.2f} | "
                f"{auroc} | {s['mean_length']:.1f} |"
            )


def seeds_table(runs, seeds=None):
    """Per seed the accuracy at steps 20 and 40 with its McNemar p against the base; then mean ± sample SD."""
    print("| method | step | seed 42 | seed 43 | seed 44 | mean ± SD over seeds |")
    print("|---|---|---|---|---|---|")
    for method, names in (seeds or SEEDS).items():
        if not any(n in runs for n in names):
            continue
        for step in (20, 40):
            cells, values = [], []
            for n in names:
                if n not in runs or step not in runs[n]["evals"]:
                    cells.append("")
                    continue
                correct, s = runs[n]["evals"][step]
                p = mcnemar_exact(runs[n]["evals"][0][0], correct)["p_value"]
                cells.append(f"{s['accuracy']:.3f} (p = {p:.2g})")
                values.append(s["accuracy"])
            spread = f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            print(f"| {method} | {step} | " + " | ".join(cells) + f" | {spread} |")


WINDOWS = [(1, 10), (11, 20), (21, 30), (31, 40)]
TRAINING = [
    ("length", "train/completion_length", 1),
    ("repeated 4-grams", "monitor/repeated_4gram_frac", 3),
    ("entropy", "monitor/entropy", 2),
    ("KL", "train/kl", 3),
    ("own SC", "train/self_certainty", 2),
    ("reward", "train/reward/", 2),  # the run's own reward, whichever it is
]


def training_table(runs, names):
    """Training metrics, each averaged over a window of 10 steps (one step is 16 completions: noisy)."""
    print("| run | steps | " + " | ".join(t for t, _, _ in TRAINING) + " |")
    print("|---|---|" + "---|" * len(TRAINING))
    for name in names:
        records = runs[name]["metrics"]
        for lo, hi in WINDOWS:
            window = [r for r in records if lo <= r["step"] <= hi]
            if not window:
                continue
            cells = []
            for _, key, digits in TRAINING:
                if key.endswith("/"):
                    key = next(k for k in window[0] if k.startswith(key))
                values = [r[key] for r in window if not math.isnan(r.get(key, math.nan))]  # null reads as NaN
                cells.append(f"{statistics.mean(values):.{digits}f}" if values else "")
            print(f"| {name} | {lo}-{hi} | " + " | ".join(cells) + " |")


def plain_table(runs):
    """The base-like regime (--prompt_format plain), each checkpoint against the base in the same format:
    accuracy, the paired test, how often an answer could be extracted at all, and completion length."""
    print("| run | step | held-out accuracy [95% CI] | vs base: b / c, p | answer found | mean length | truncated |")
    print("|---|---|---|---|---|---|---|")
    names = [n for n in runs if n.startswith("plain_")]
    for i, name in enumerate(names):
        for step, (correct, s) in sorted(runs[name]["evals"].items()):
            if step == 0 and i > 0:
                continue  # the base, once
            test = mcnemar_exact(runs[name]["evals"][0][0], correct)
            paired = "–" if step == 0 else f"{test['only_before']} / {test['only_after']}, {test['p_value']:.2g}"
            lo, hi = s["accuracy_ci95"]
            label = "plain_base" if step == 0 else name
            print(f"| {label} | {step} | {s['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {paired} | "
                  f"{s['answer_found_frac']:.3f} | {s['mean_length']:.1f} | {s['truncated_frac']:.2f} |")  # fmt: skip


def wall_times(runs, folder):
    """Seconds on 2 cores, from the /usr/bin/time lines docs/over_training.sh leaves in each run's logs."""
    print("| run | training (s) | evaluations (s, one per checkpoint) |")
    print("|---|---|---|")
    for name in runs:
        logs = [os.path.join(folder, f"{name}{kind}.log") for kind in (".train", "", ".eval")]  # kept, as run
        text = "".join(open(p, encoding="utf-8").read() for p in logs if os.path.isfile(p))
        train = re.findall(rf"^{re.escape(name)} train wall ([\d.]+) s$", text, re.M)
        evals = re.findall(rf"^{re.escape(name)} step \d+ eval wall ([\d.]+) s$", text, re.M)
        print(
            f"| {name} | {' '.join(f'{float(t):.0f}' for t in train)} | {', '.join(f'{float(t):.0f}' for t in evals)} |"
        )


def plot(runs, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {
        "grpo": ("tab:blue", "-"),
        "intuitor": ("tab:red", "-"),
        "offline": ("tab:purple", "--"),
        "intuitor_lr1e-5": ("tab:orange", "-."),
        "intuitor_beta0.1": ("tab:green", ":"),
        "token_sc": ("tab:brown", "--"),
        "mean_logprob": ("tab:olive", "-."),
        "answer_sc": ("tab:cyan", ":"),
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, run in runs.items():
        method = name.split("_seed")[0]
        colour, line = style.get(method, ("tab:gray", "-"))
        seed = name != method
        kw = {
            "color": colour,
            "linestyle": line,
            "marker": "o",
            "alpha": 0.45 if seed else 1.0,
            "linewidth": 1.0 if seed else 2.0,
            "label": name,
        }
        steps = sorted(run["evals"])
        axes[0].plot(steps, [run["evals"][s][1]["accuracy"] for s in steps], **kw)
        axes[1].plot(steps, [run["evals"][s][1]["mean_self_certainty"] for s in steps], **kw)
        records = [r for r in run["metrics"] if not math.isnan(r.get("monitor/entropy", math.nan))]
        if records:
            entropy = [r["monitor/entropy"] for r in records]
            smooth = [statistics.mean(entropy[max(0, i - 4) : i + 1]) for i in range(len(entropy))]
            axes[2].plot([r["step"] for r in records], smooth, **{**kw, "marker": None})
    titles = [
        "held-out accuracy (300 problems, greedy)",
        "held-out mean self-certainty",
        "training token entropy (5-step mean)",
    ]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_xticks([0, 10, 20, 30, 40])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"\nfigure: {out}")


def main(argv):
    out = None
    if "--plot" in argv:
        i = argv.index("--plot")
        out, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    folder = argv[0] if argv else os.path.join(ROOT, "docs", "over_training")
    runs = collect(folder)
    if not runs:
        raise SystemExit(f"error: no NAME.stepN.eval.jsonl records in {folder}; run docs/over_training.sh first")
    print("### Held-out accuracy at each evaluated step (step 0: the base model)\n")
    accuracy_table(runs)
    print("\n### Seeds\n")
    seeds_table(runs)
    seed42 = ["grpo", "intuitor", "offline", "intuitor_lr1e-5", "intuitor_beta0.1", "token_sc", "mean_logprob"]
    single = [n for n in seed42 + ["answer_sc"] if n in runs]
    print("\n### Every evaluated checkpoint (seed 42 runs)\n")
    detail_table(runs, single)
    print("\n### Training metrics, mean over 10 steps\n")
    training_table(runs, [n for n in single if n != "grpo"])
    if any(n.startswith("plain_") for n in runs):
        print("\n### The base-like regime (--prompt_format plain), against the base in the same format\n")
        plain_table(runs)
        print()
        seeds_table(runs, PLAIN_SEEDS)
        print()
        training_table(runs, [n for n in ("plain_grpo", "plain_intuitor") if n in runs])
    print("\n### Wall times\n")
    wall_times(runs, folder)
    if out:
        plot(runs, out)


if __name__ == "__main__":
    main(sys.argv[1:])
