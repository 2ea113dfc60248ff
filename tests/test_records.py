"""The pages that show records and code say what the records and the code hold: docs/over_training.md's tables
are what docs/over_training.py prints from docs/over_training/ (a number edited by hand, or a record replaced
without the page, fails here), and README's Paper -> code links point at the definitions they name."""

import importlib.util
import os

from conftest import ROOT


def over_training_report():
    path = os.path.join(ROOT, "docs", "over_training.py")
    spec = importlib.util.spec_from_file_location("over_training_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_over_training_page_tables_are_the_records(capsys):
    over_training_report().main([])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    page = open(os.path.join(ROOT, "docs", "over_training.md"), encoding="utf-8").read().splitlines()
    assert len(rows) > 30  # every table printed: accuracy, seeds, checkpoints, training metrics, wall times
    missing = [row for row in rows if row not in page]
    assert not missing, f"docs/over_training.md rows that differ from docs/over_training.py's output: {missing}"


def test_seed_spread_is_mean_and_sample_sd(capsys):
    report = over_training_report()
    runs = report.collect(os.path.join(ROOT, "docs", "over_training"))
    report.seeds_table(runs)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| grpo | 40 |"))
    values = [runs[n]["evals"][40][1]["accuracy"] for n in report.SEEDS["grpo"] if n in runs]
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    assert row.endswith(f"| {mean:.3f} ± {sd:.3f} |")


def test_readme_links_point_at_the_definitions():
    spec = importlib.util.spec_from_file_location("readme_links", os.path.join(ROOT, "docs", "readme_links.py"))
    links = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(links)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(links.LINK.findall(readme)) >= 20
    stale = links.stale_links(readme)
    assert not stale, f"README links that point elsewhere (linked -> defined): {stale}; run python docs/readme_links.py"
