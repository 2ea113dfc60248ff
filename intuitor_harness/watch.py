"""Watching a run: the step's metrics and monitors, the reward-hacking alarm, statistics, trackers, plots."""

import io
import math
import os
import subprocess
import sys

import torch
import torch.distributed as dist

from intuitor_harness.process import all_reduce, die, gather
from intuitor_harness.runs import append_line, atomic_write, read_metrics, strict_json

# The console's step line (under 120 columns): a few numbers, each under a short name; metrics.jsonl has them all.
STEP_LINE = {"train/self_certainty": "SC", "train/accuracy": "acc", "train/completion_length": "len",
             "train/kl": "kl", "train/loss": "loss", "train/grad_norm": "grad", "train/lr": "lr"}  # fmt: skip


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


def step_metrics(step, rollouts, rewards, update, lr, has_gold, timings, num_generations):
    """The step's record for metrics.jsonl: means over all ranks' sequences. monitor/* watch for reward hacking
    and collapse: token entropy, repeated 4-grams, groups whose rewards are all equal (no learning signal)
    and, with gold answers, whether self-certainty still tells right from wrong (AUROC over the step's
    completions) and picks winners (accuracy of each group's most self-certain completion vs the mean).
    `rewards`: one value per rollout each; `timings`: seconds of the step's phases (sample_s, reward_s: grading
    and the reference pass, update_s)."""
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
    tokens_per_s = mean(lengths) * n / timings["sample_s"]
    return (
        record
        | {"train/lr": lr, "perf/sample_tokens_per_s": tokens_per_s}
        | {f"perf/{key}": seconds for key, seconds in timings.items()}
    )


class HackingAlarm:
    """Watches the step records for the signatures of reward hacking (paper Fig. 7: length or repetition
    jumps while the reward rises and accuracy, when known, falls) and of entropy collapse, comparing the
    last `window` steps with the `window` before them. check(record) returns (1 while a signature holds, else
    0; a one-line message when a signature first appears, else None)."""

    def __init__(self, window=5, length_jump=0.25, repetition_jump=0.1, accuracy_drop=0.05, entropy_floor=0.5):
        self.window, self.history, self.flags = window, [], [0]
        self.length_jump, self.repetition_jump = length_jump, repetition_jump
        self.accuracy_drop, self.entropy_floor = accuracy_drop, entropy_floor

    def resume(self, records):
        """A resumed run's alarm continues from the records it kept, as if it had never stopped: its windows and
        its first steps' entropy are the uninterrupted run's."""
        self.history = list(records)
        self.flags = [0] + [int(r.get("monitor/alarm", 0) == 1) for r in records]

    def check(self, record):
        self.history.append(record)
        flag, message = self.signature(record)
        announce = flag and not self.flags[-1]  # the same episode is flagged on every record, announced once
        self.flags.append(flag)
        return flag, message if announce else None

    def signature(self, record):
        w = self.window
        if len(self.history) < 2 * w:
            return 0, None
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
            return 0, None
        why = ", ".join(signs) + " while the reward rose" if hacking else ""
        why += ("; " if why else "") + ("token entropy collapsed" if collapse else "")
        return 1, f"ALARM step {record['step']}: {why} (reward hacking or collapse; read the completions)"


class Watcher:
    """What every step leaves behind: its record in metrics.jsonl (and the tracker), a console line, the alarm,
    now and then a sample completion; at the end, the line naming the checkpoint and the plot command."""

    def __init__(self, metrics_path, max_steps, rank, report_to, output_dir, config, tokenizer,
                 log_completions_steps, has_gold, num_generations, run_name="intuitor"):  # fmt: skip
        self.metrics_path, self.max_steps, self.rank, self.tokenizer = metrics_path, max_steps, rank, tokenizer
        self.log_completions_steps, self.has_gold, self.num_generations = (
            log_completions_steps,
            has_gold,
            num_generations,
        )
        self.alarm, self.warned_equal = HackingAlarm(), False
        self.alarm.resume(read_metrics(metrics_path))  # the kept records (empty for a new run)
        self.tracker = make_logger(report_to, output_dir, config, run_name) if rank == 0 else None

    def record(self, step, rollouts, rewards, update, lr, timings):
        """Called by every rank (the metrics are means over all ranks); rank 0 writes and prints."""
        record = step_metrics(step, rollouts, rewards, update, lr, self.has_gold, timings, self.num_generations)
        record["monitor/alarm"], warning = self.alarm.check(record)
        if self.rank != 0:
            return
        log_step(self.metrics_path, record, self.max_steps, self.tracker)
        if warning:
            say(warning)
        if record["monitor/equal_reward_groups"] > 1 - 1e-6 and not self.warned_equal:  # once per run
            self.warned_equal = True
            say(f"warning: step {step}: every group's rewards were equal, so the step learned nothing (a reward that "
                "did not vary, or identical completions: raise --temperature, --top_p or --top_k)")  # fmt: skip
        if self.log_completions_steps and (step == 1 or step % self.log_completions_steps == 0):
            show_completion(self.tokenizer, rollouts[0])

    def done(self, final_checkpoint):
        """The run's last line: its final checkpoint (None: --final_checkpoint false) and the plot command."""
        if self.rank == 0:
            kept = final_checkpoint or "no checkpoint at the end (--final_checkpoint false)"
            say(f"done: {kept}; curves: python intuitor.py plot {self.metrics_path}")


def make_logger(report_to, output_dir, config, run_name="intuitor"):
    """A tracker beside metrics.jsonl (which stays the source of truth): tensorboard or wandb, or None."""
    if report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            die("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
        writer = SummaryWriter(os.path.join(output_dir, "tensorboard", run_name))

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
        run = wandb.init(project="intuitor", name=run_name, dir=output_dir, config=config)

        def to_wandb(record):
            run.log({key: value for key, value in record.items() if key != "step"}, step=record["step"])

        return to_wandb
    return None


def say(line):
    """A line on stdout that never lands inside a live progress bar (tqdm.write clears and redraws the bars)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def progress_bars(rank=0):
    """Progress bars only on an interactive terminal (rank 0): in a log file their carriage returns garble lines."""

    return rank == 0 and sys.stderr.isatty()


def quiet_libraries():
    """No progress bar from any library (datasets' "Generating train split", the GGUF conversion, "Loading
    weights", "Writing model shards"): in a log file their carriage returns garble lines, and on a terminal they
    repeat at every load and checkpoint. They all draw with tqdm, so its default becomes disable=True; the
    project's own bars pass `disable` explicitly. A closed stdout or stderr (`| head`, a `tee` that died) ends
    no run: their writes are dropped from then on (survive_closed_pipe)."""
    survive_closed_pipe()
    import functools

    import tqdm.std

    if not getattr(tqdm.std.tqdm, "quieted", False):
        tqdm.std.tqdm.__init__ = functools.partialmethod(tqdm.std.tqdm.__init__, disable=True)
        tqdm.std.tqdm.quieted = True


class ClosedPipeSafe(io.TextIOBase):
    """A stream that drops its writes once its reader has gone (BrokenPipeError), instead of raising them."""

    def __init__(self, stream):
        self.stream, self.gone = stream, False

    def write(self, text):
        if not self.gone:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self.gone = True
        return len(text)

    def flush(self):
        if not self.gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self.gone = True

    def isatty(self):
        return self.stream.isatty()

    def fileno(self):
        return self.stream.fileno()

    @property
    def encoding(self):
        return self.stream.encoding


def survive_closed_pipe():
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), ClosedPipeSafe):
            setattr(sys, name, ClosedPipeSafe(getattr(sys, name)))


def step_line(record, max_steps):
    """'step 3/40 | SC 8.15 | acc 0.25 | len 13.2 | kl 0.0012 | loss 0.0066 | grad 0.66 | lr 4.1e-05 | 25 s'."""
    shown = [f"{short} {record[key]:.3g}" for key, short in STEP_LINE.items() if key in record]
    seconds = sum(record.get(f"perf/{phase}_s", 0.0) for phase in ("sample", "reward", "update"))
    return " | ".join([f"step {record['step']}/{max_steps}", *shown, f"{seconds:.0f} s"])


def log_step(path, record, max_steps, logger=None):
    """Append the step's record to metrics.jsonl (and the tracker), print its main numbers on one line."""
    append_line(path, strict_json(record) + "\n")
    if logger is not None:
        logger(record)
    say(step_line(record, max_steps))


def show_completion(tokenizer, rollout):
    text = tokenizer.decode(rollout.completion)[:1000]
    say(f"--- sample completion (self-certainty {rollout.self_certainty:.3f}) ---\n{text}\n---")


PANELS = [  # (title, y-axis label, keys)
    ("self-certainty", "SC (nats)", ["train/self_certainty", "train/reward/self_certainty"]),
    ("completion length", "tokens", ["train/completion_length", "train/completion_length_max"]),
    ("KL to initial model", "KL (nats)", ["train/kl"]),
    ("accuracy (monitor)", "fraction correct", ["train/accuracy", "monitor/most_certain_accuracy"]),
    ("token entropy", "nats", ["monitor/entropy"]),
    ("repeated 4-grams", "fraction", ["monitor/repeated_4gram_frac"]),
    ("self-certainty vs correct", "AUROC", ["monitor/certainty_auroc"]),
]


PLOT_USAGE = "python intuitor.py plot RUN [MORE ...] [OUT.png] [--force] (RUN: a run's folder or its metrics.jsonl)"


def tracked_by_git(path):

    where = os.path.dirname(os.path.abspath(path))
    ls = subprocess.run(["git", "-C", where, "ls-files", "--error-unmatch", os.path.abspath(path)], capture_output=True)
    return ls.returncode == 0


def run_labels(paths):
    """A legend label per metrics file: its run folder's name, with as many parent folders as it takes to tell
    runs with equal folder names apart."""
    parts = [os.path.dirname(os.path.abspath(p)).split(os.sep) for p in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return list(paths)


def plot_metrics(*argv):
    """One PNG of training curves (paper Fig. 3 / Fig. 7): self-certainty, completion length, KL, accuracy.
    One run: every logged variant of each; several runs: one line per run, so methods can be compared. The
    default OUT is the first run's metrics.png; a file tracked by git is overwritten only with --force."""
    if set(argv) & {"-h", "--help"}:
        print(f"usage: {PLOT_USAGE}")
        raise SystemExit(0)
    outs = [a for a in argv if a.lower().endswith(".png")]
    runs_given = [a for a in argv if a not in outs and a != "--force"]
    paths = [os.path.join(a, "metrics.jsonl") if os.path.isdir(a) else a for a in runs_given]
    if not paths or len(outs) > 1:
        die(f"plot: pass one or more runs and at most one OUT.png: {PLOT_USAGE}")
    unknown = [a for a in runs_given if not a.endswith(".jsonl") and not os.path.isdir(a)]
    if unknown:
        die(f"plot: {unknown[0]!r} is neither a run's folder nor a metrics.jsonl: {PLOT_USAGE}")
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
    if os.path.isdir(out) or not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        die(f"{out}: the plot's path must be a file in an existing folder; pass another OUT.png")
    if os.path.exists(out) and "--force" not in argv and tracked_by_git(out):
        die(f"{out} is a file tracked by git; pass another OUT.png, or --force to overwrite it")
    runs = {label: read_metrics(path) for label, path in zip(run_labels(paths), paths)}
    for path, records in zip(paths, runs.values()):
        if not records:
            die(f"{path} holds no step records; pass a run's output_dir/metrics.jsonl")
        bad = next((k for r in records for k, v in r.items() if not isinstance(v, (int, float))), None)
        if bad is not None:
            die(f"{path}: {bad!r} holds a value that is not a number; repair the file or pass another run")

    def has_values(key):  # a key whose values are all null (NaN) was not measured: no panel for it
        return any(key in r and math.isfinite(r[key]) for rs in runs.values() for r in rs)

    logged = [(title, label, [k for k in keys if has_values(k)]) for title, label, keys in PANELS]
    panels = [(title, label, keys if len(runs) == 1 else keys[:1]) for title, label, keys in logged if keys]
    if not panels:
        known = ", ".join(k for _, _, keys in PANELS for k in keys)
        die(f"{', '.join(paths)}: none of the plotted metrics is logged ({known}); pass metrics.jsonl of intuitor.py")
    rows, cols = (len(panels) + 3) // 4, min(len(panels), 4)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    from matplotlib.ticker import MaxNLocator

    short = max(len(records) for records in runs.values()) <= 30  # few points: each one marked
    for ax, (title, label, keys) in zip(axes.flat, panels):
        for name, records in runs.items():
            for style, key in zip(("-", "--", ":"), keys):  # a second key's line stays visible over the first
                own = [(r[key], r["train/self_certainty"]) for r in records if key in r and "train/self_certainty" in r]
                online = bool(own) and all(abs(a - b) < 1e-4 for a, b in own)
                if key == "train/reward/self_certainty" and online:
                    continue  # the reward is the policy's own SC, already drawn
                steps, values = [r["step"] for r in records if key in r], [r[key] for r in records if key in r]
                ax.plot(steps, values, style, marker="o" if short else None, markersize=3,
                        label=key.split("/", 1)[1] if len(runs) == 1 else name)  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.suptitle(", ".join(runs))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    atomic_write(out, png.getvalue(), "nothing was written there; pass an OUT.png on a writable disk")
    print(f"wrote {out}")
    return out
