"""eval.py: grading, statistics against hand-computed values, best-of-N selectors, and the script end to end."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, torchrun

import eval as E
from intuitor_harness import benchmarks as B
from intuitor_harness import tasks as T

DATA = os.path.join(ROOT, "tests", "data")


# ---------------------------------------------------------------- grading
def test_boxed_extraction_with_nested_braces():
    text = "First \\boxed{2}. Finally $\\boxed{\\dfrac{3}{\\sqrt{2}}}$ done."
    assert T.last_boxed(text) == "\\dfrac{3}{\\sqrt{2}}"
    assert T.last_boxed("no box here") is None
    assert T.last_boxed("\\boxed{unclosed") is None
    assert T.last_boxed("\\fbox{7}") == "7"


def test_gold_answers():
    assert T.gold_answer("She pays 36 + 36 = 72.\n#### 72", "answer") == "72"
    assert T.gold_answer("#### 1,234", "answer") == "1234"
    assert T.gold_answer("\\frac{14}{3}", "answer") == "\\frac{14}{3}"
    assert T.gold_answer("so $\\boxed{\\frac{1}{2}}$.", "solution") == "\\frac{1}{2}"


@pytest.mark.parametrize(
    "completion,bench,gold,correct",
    [
        ("The answer is \\boxed{0.5}.", "math500", "\\frac{1}{2}", True),  # decimal vs fraction
        ("\\boxed{\\frac{1}{2}}", "math500", "0.5", True),
        ("\\boxed{\\dfrac{14}{3}}", "math500", "\\frac{14}{3}", True),
        ("\\boxed{3}", "math500", "\\frac{14}{3}", False),
        ("I am not sure.", "math500", "4", False),  # no answer -> incorrect
        ("She earns 1,234 dollars in total.", "gsm8k", "1234", True),  # commas, last number
        ("3 apples and 4 pears make 7.", "gsm8k", "7", True),
        ("So \\boxed{72} and then 5 more words 9", "gsm8k", "72", True),  # the box wins over the last number
        ("no digits at all", "gsm8k", "72", False),
    ],
)
def test_grading(completion, bench, gold, correct):
    assert T.is_correct(T.extract_answer(completion, B.BENCHMARKS[bench].answer_format), gold) is correct


# ---------------------------------------------------------------- statistics (hand-computed)
def test_mann_whitney_without_ties():
    # every correct value beats every incorrect one: U = n1*n2 = 6, AUROC 1, r = 1;
    # mu = 3, sigma = sqrt(3*2/12 * 6) = sqrt(3), z = (3 - 0.5)/sqrt(3) = 1.4434, p = erfc(z/sqrt 2) = 0.14891
    s = E.mann_whitney([3, 4, 5], [1, 2])
    assert s["U"] == 6 and s["auroc"] == 1 and s["rank_biserial"] == 1
    assert s["p_value"] == pytest.approx(0.14891, abs=1e-5)


def test_mann_whitney_with_ties():
    # pairs (x, y): (1,2) 0, (1,3) 0, (2,2) .5, (2,3) 0, (2,2) .5, (2,3) 0 -> U = 1, AUROC 1/6, r = -2/3;
    # one tie of 3 values: sigma = sqrt(6/12 * (6 - 24/20)) = sqrt(2.4), z = (2 - 0.5)/sqrt(2.4), p = 0.33292
    s = E.mann_whitney([1, 2, 2], [2, 3])
    assert s["U"] == 1 and s["auroc"] == pytest.approx(1 / 6) and s["rank_biserial"] == pytest.approx(-2 / 3)
    assert s["p_value"] == pytest.approx(0.33292, abs=1e-5)
    assert E.mann_whitney([1.0], []) is None


def test_wilson_interval():
    lo, hi = E.wilson_interval(5, 10)  # p = .5, z^2/n = .38416: centre .5, half 1.96*sqrt(.025+.009604)/1.38416
    assert (lo, hi) == (pytest.approx(0.23659, abs=1e-5), pytest.approx(0.76341, abs=1e-5))


# ---------------------------------------------------------------- best-of-N selectors
def test_majority_and_self_certainty_disagree():
    answers, sc = ["3", "5", "5", "7"], [0.9, 0.1, 0.2, 0.3]
    chosen = E.select(answers, sc, p=0.5)
    assert chosen["self_certainty"] == 0  # the most certain sample says 3
    assert chosen["majority"] == 2  # two samples say 5; its most certain one is index 2
    # Borda, N = 4, p = .5: ranks by SC 0,3,2,1 score 2, 1.732, 1.414, 1 -> "3": 2, "7": 1.732, "5": 2.414
    assert chosen["borda"] == 2


def test_borda_can_overrule_majority():
    answers, sc = ["3", "3", "5", "5", "5"], [0.9, 0.8, 0.1, 0.2, 0.3]
    chosen = E.select(answers, sc, p=1.0)  # "3": 5 + 4 = 9, "5": 3 + 2 + 1 = 6
    assert answers[chosen["majority"]] == "5" and answers[chosen["borda"]] == "3"


def test_equivalent_answers_vote_together_and_no_answer_never_wins():
    chosen = E.select(T.answer_clusters(["0.5", "\\frac{1}{2}", "2", None, None]), [0.1, 0.2, 0.9, 0.95, 0.99])
    assert chosen["majority"] == 1 and chosen["self_certainty"] == 4
    assert E.select([None, None], [0.1, 0.2])["majority"] == 1  # nothing to vote on: the most certain
    assert E.select(None, [0.1, 0.2]) == {"self_certainty": 1}  # programs: no votes


# ---------------------------------------------------------------- the script
def run_eval(tiny_dir, out, *extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "eval.py"),
            "--model",
            tiny_dir,
            "--max_new_tokens",
            "6",
            "--batch_size",
            "4",
            "--output",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in open(out)], json.load(open(str(out).replace(".jsonl", ".summary.json")))


def test_eval_script_math500(tiny_dir, tmp_path):
    records, summary = run_eval(
        tiny_dir,
        tmp_path / "r.jsonl",
        "--benchmark",
        "math500",
        "--data",
        os.path.join(DATA, "math500_tiny.jsonl"),
        "--limit",
        "5",
    )
    assert len(records) == 5 and summary["n_problems"] == 5
    for key in (
        "problem",
        "completion",
        "extracted",
        "gold",
        "correct",
        "self_certainty",
        "length",
        "truncated",
        "subject",
        "level",
    ):
        assert key in records[0], key
    assert records[0]["gold"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    for key in (
        "accuracy",
        "accuracy_ci95",
        "accuracy_by_subject",
        "accuracy_by_level",
        "mean_length",
        "truncated_frac",
        "self_certainty_vs_correctness",
    ):
        assert key in summary, key


def test_eval_script_gsm8k_best_of_n(tiny_dir, tmp_path):
    records, summary = run_eval(
        tiny_dir,
        tmp_path / "r.jsonl",
        "--benchmark",
        "gsm8k",
        "--data",
        os.path.join(DATA, "gsm8k_tiny.jsonl"),
        "--n",
        "3",
        "--temperature",
        "1.0",
    )
    assert len(records) == 6 and all(len(r["samples"]) == 3 for r in records)
    assert records[0]["gold"] == "18"
    for rule in ("self_certainty", "majority", "borda", "pass@n"):
        assert 0 <= summary[f"best_of_n/{rule}"] <= 1
    assert summary["best_of_n/pass@n"] >= max(
        summary[f"best_of_n/{r}"] for r in ("self_certainty", "majority", "borda")
    )


def test_eval_under_torchrun_gathers_all_problems_in_order(tiny_dir, tmp_path):
    args = [
        "--model",
        tiny_dir,
        "--benchmark",
        "gsm8k",
        "--data",
        os.path.join(DATA, "gsm8k_tiny.jsonl"),
        "--max_new_tokens",
        "6",
        "--batch_size",
        "2",
    ]
    one, _ = run_eval(tiny_dir, tmp_path / "one.jsonl", *args[2:])
    torchrun(2, os.path.join(ROOT, "eval.py"), *args, "--output", str(tmp_path / "two.jsonl"))
    two = [json.loads(line) for line in open(tmp_path / "two.jsonl")]
    assert [r["index"] for r in two] == list(range(6))
    assert [r["completion"] for r in two] == [r["completion"] for r in one]  # greedy: sharding changes nothing


def test_plot_subcommand(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(
            json.dumps(
                {
                    "step": i,
                    "train/self_certainty": 0.1 * i,
                    "train/completion_length": 10 + i,
                    "train/kl": 0.01 * i,
                    "train/accuracy": 0.5,
                }
            )
            + "\n"
            for i in range(1, 5)
        )
    )
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "intuitor.py"), "plot", str(metrics), str(tmp_path / "c.png")],
        capture_output=True,
        text=True,
    )
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # optional dependency: a clear line instead
        assert p.returncode != 0 and "pip install matplotlib" in p.stderr and "Traceback" not in p.stderr
        return
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mcnemar_exact():
    # b = 1 right only before, c = 6 right only after: p = 2 * P(Bin(7, .5) <= 1) = 2 * 8 / 128 = 0.125
    before = [1, 0, 0, 0, 0, 0, 0, 1, 1]
    after = [0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert E.mcnemar_exact(before, after) == {"only_before": 1, "only_after": 6, "p_value": 0.125}
    # b = 0, c = 8: 2 * (1 / 256) = 0.0078125; no discordant pairs: p = 1
    assert E.mcnemar_exact([0] * 8, [1] * 8)["p_value"] == 2 / 256
    assert E.mcnemar_exact([1, 0], [1, 0])["p_value"] == 1.0


def test_compare_prints_one_paired_row_per_run(tmp_path):
    def write(name, correct):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"index": i, "correct": c}) + "\n" for i, c in enumerate(correct)))
        summary = {"benchmark": "gsm8k", "accuracy": sum(correct) / len(correct), "accuracy_ci95": [0.0, 1.0],
                   "mean_length": 5.0, "truncated_frac": 0.0, "mean_self_certainty": 1.0,
                   "self_certainty_vs_correctness": {}}  # fmt: skip
        (tmp_path / f"{name}.summary.json").write_text(json.dumps(summary))
        return str(path)

    base, after = write("base", [0] * 8), write("after", [1] * 8)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "compare", base, after], capture_output=True,
                       text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = [line for line in p.stdout.splitlines() if line.startswith(f"| {tmp_path}")]
    assert len(rows) == 2 and rows[1].endswith("| 0 / 8, 0.0078 |")
