"""Questions and their answers: datasets, final-answer extraction and grading, plurality votes, the arithmetic task.

The GRPO / GRPO-PV rewards and every math benchmark grade with the same functions; INTUITOR never reads a gold answer.
    python -m intuitor_harness.tasks arithmetic data     # writes data/arithmetic_{train,test}.jsonl
"""

import itertools
import json
import os
import random
import re
import sys
from collections import Counter

from intuitor_harness.process import check_hub, die

# ----------------------------------------------------------------------------- questions
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_rows(path, split, flag="--dataset", config=""):
    """Rows of a hub dataset or a local .json/.jsonl/.parquet file, via datasets.load_dataset; never empty."""
    from datasets import load_dataset

    local = LOCAL_FORMATS.get(os.path.splitext(path)[1])
    if not local and (os.path.isfile(path) or os.path.splitext(path)[1] in (".csv", ".tsv", ".txt")):
        die(f"{flag} {path!r}: not a .json/.jsonl/.parquet file or a hub dataset; convert it to .jsonl")
    if local and not os.path.isfile(path):
        die(f"{flag} {path!r}: no such file")
    if not local:
        check_hub([(flag, path, "dataset")])
    if local == "json":
        check_utf8(path, flag)
    try:
        if local:
            rows = load_dataset(local, data_files=path, split="train")
        else:
            rows = load_dataset(path, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - unreadable for any reason (malformed JSON, missing split): one line
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        die(f"cannot load {flag} {path!r} ({reason}); pass a hub dataset or a valid local .jsonl/.parquet file")
    if len(rows) == 0:
        die(f"{flag} {path!r} has no rows")
    return rows


def check_utf8(path, flag):
    """A JSON file must be UTF-8 text; else one line naming the first bad byte (the datasets library would load
    it and fail only when the row is read)."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                die(f"{flag} {path!r}: byte {offset + e.start} is not UTF-8 text; re-save the file as UTF-8")
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        die(f"{flag} {path!r}: the file ends inside a UTF-8 character (truncated?); re-save it as UTF-8")


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
                   fix="pass --prompt_column", config=""):  # fmt: skip
    """(rows, questions, gold answers) of a dataset; questions pass check_texts. need_gold: gold answers must
    exist."""
    rows = load_rows(path, split, flag, config)
    if prompt_column not in rows.column_names:
        die(f"{flag} {path!r} has no column {prompt_column!r} (columns: {', '.join(rows.column_names)}); {fix}")
    questions = check_texts(rows, prompt_column, f"{flag} {path!r}")
    golds = gold_answers(rows, answer_column)
    if need_gold and all(gold is None for gold in golds):
        die(f"{flag} {path!r} has no gold answers (an `answer` or `solution` column); pass --answer_column")
    if need_gold:
        check_every_gold(golds, f"{flag} {path!r}")
    return rows, questions, golds


def check_every_gold(golds, source):
    """Gold answers that are read must all be there: a row whose gold is null would be graded wrong forever."""
    missing = [i for i, gold in enumerate(golds) if gold is None]
    if missing:
        rows = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        die(f"{source}: row(s) {rows} (counted from 0) have no gold answer (null or empty); remove them or fill "
            "them in")  # fmt: skip


# ----------------------------------------------------------------------------- answers
NUMBER = re.compile(r"-?\d(?:[\d,]*\d)?(?:\.\d+)?")  # 1,234.5; a comma after the number is not part of it


def last_boxed_span(text):
    """[start, end) character offsets of the content of the last \\boxed{...} (or \\fbox{...}), nested braces
    included, surrounding spaces excluded; None if there is none (or it is never closed)."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            content = text[i + 1 : j]
            left = len(content) - len(content.lstrip())
            return i + 1 + left, i + 1 + left + len(content.strip())
    return None


def last_boxed(text):
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces included; None if there is none."""
    span = last_boxed_span(text)
    return None if span is None else text[span[0] : span[1]]


def answer_span(completion, answer_format):
    """[start, end) character offsets of the final answer that extract_answer reads: the last \\boxed{}
    content; with answer_format "number", failing a box, the last number. None when there is no answer."""
    span = last_boxed_span(completion)
    if span is not None or answer_format != "number":
        return span
    numbers = list(NUMBER.finditer(completion))
    return numbers[-1].span() if numbers else None


def decoded_tokens(tokenizer, ids):
    """(text, ends): the ids decoded one token at a time and joined, and each token's end offset in that text,
    so that a character offset maps back to a token."""
    pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in ids]
    return "".join(pieces), list(itertools.accumulate(map(len, pieces)))


def answer_token_span(tokenizer, completion, answer_format):
    """[start, end) token indices of the completion's final answer (answer_span: the last \\boxed{} content, or
    the last number with answer_format "number"), or None. The text is decoded one token at a time so that
    character offsets map back to tokens; a token counts when any of its characters falls inside the answer."""
    text, ends = decoded_tokens(tokenizer, completion)
    span = answer_span(text, answer_format)
    if span is None:
        return None
    starts = [0, *ends[:-1]]
    inside = [k for k, (start, end) in enumerate(zip(starts, ends)) if start < span[1] and end > span[0]]
    return (inside[0], inside[-1] + 1) if inside else None


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
    else the value itself; None for a missing one (JSON null, an empty string)."""
    if value is None or not str(value).strip():
        return None
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


LATEX_ARGUMENT = r"(\{[^{}]*\}|\\[a-zA-Z]+|[0-9a-zA-Z])"  # {...}, a command (\pi) or one character
FRACTION = re.compile(r"\\([dt]?frac)\s*" + LATEX_ARGUMENT + r"\s*" + LATEX_ARGUMENT)
ROOT = re.compile(r"\\sqrt\s*(\\[a-zA-Z]+|[0-9a-zA-Z])")


def braced(argument):
    return argument if argument.startswith("{") else "{" + argument + "}"


def in_math_mode(latex):
    """An answer as math-verify reads it: an escaped dollar (\\$, a currency sign, as in MATH's \\$18.90) and
    \\! (a negative thin space, as in 32,\\!348) are dropped, so the bare value is compared; brace-less
    arguments get their braces (\\frac \\pi4 -> \\frac{\\pi}{4}, \\sqrt2 -> \\sqrt{2}), which math-verify would
    otherwise misread; text that is not already between $ delimiters is put between them."""
    latex = latex.replace("\\$", "").replace("\\!", "")
    latex = FRACTION.sub(lambda m: f"\\{m[1]}{braced(m[2])}{braced(m[3])}", latex)
    latex = ROOT.sub(lambda m: f"\\sqrt{{{m[1]}}}", latex)
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


def plurality_winner(labels, scores=None):
    """The one vote rule (GRPO-PV's reward, best-of-N majority and Borda in eval.py): the label with the most
    votes, or the highest total of `scores` (one per label); None never votes. A tie goes to the label seen
    first: sampling order is random, so ties are broken fairly and without self-certainty, which keeps majority
    voting a baseline free of it. None when nothing votes."""
    totals, first = Counter(), {}
    for i, label in enumerate(labels):
        if label is not None:
            totals[label] += 1 if scores is None else scores[i]
            first.setdefault(label, i)
    return max(totals, key=lambda label: (totals[label], -first[label])) if totals else None


def plurality_votes(answers):
    """GRPO-PV: 1 for answers equal (by math-verify) to the group's plurality answer (plurality_winner), 0 for
    the others and for no answer."""
    labels = answer_clusters(answers)
    top = plurality_winner(labels)
    return [float(label is not None and label == top) for label in labels]


# ----------------------------------------------------------------------------- the arithmetic task
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


if __name__ == "__main__":  # python -m intuitor_harness.tasks arithmetic DIR: writes DIR/arithmetic_{train,test}.jsonl
    if sys.argv[1:2] != ["arithmetic"] or len(sys.argv) != 3:
        die("usage: python -m intuitor_harness.tasks arithmetic OUTPUT_DIR")
    os.makedirs(sys.argv[2], exist_ok=True)
    for name, split in zip(("train", "test"), arithmetic_splits()):
        with open(os.path.join(sys.argv[2], f"arithmetic_{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in split)
        print(f"wrote {len(split)} problems to {os.path.join(sys.argv[2], f'arithmetic_{name}.jsonl')}")
