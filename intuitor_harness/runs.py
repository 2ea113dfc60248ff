"""A run's directory: one run per directory and its lock, trusted checkpoints, resume, metrics.jsonl."""

import errno
import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
from contextlib import suppress

import torch

from intuitor_harness import process
from intuitor_harness.process import die

# Flags that --resume may change: they do not change what the run computes. --max_steps is not one of them: it
# sets the length of the cosine schedule, so a resumed run with another --max_steps would train on another one.
MAY_CHANGE_ON_RESUME = set(
    """save_steps final_checkpoint save_total_limit resume overwrite_output_dir device output_dir log_completions_steps
    micro_batch_size chunk_size vocab_chunk_size gradient_checkpointing sampler sampling_weights report_to
    parallel resume_from_checkpoint run_name""".split()
)
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoints(output_dir):
    """Paths of output_dir/checkpoint-<step>, oldest first; other folders (checkpoint-6.bak) are ignored."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = sorted(int(m.group(1)) for m in map(CHECKPOINT.fullmatch, names) if m)
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]


class RunDirectory:
    """One run per output directory: its metrics.jsonl and checkpoint-N/ folders, locked while the run lives.

    - Built before anything loads: checks without writing that the directory is usable, holds no earlier run
      unless --resume or --overwrite_output_dir, and is not in use by a running run.
    - open() creates and locks it once the models have loaded, and repeats the check under the lock, so two
      runs started on one new directory cannot both write there.
    Checks run on rank 0 and every rank stops with its verdict (process.on_first_rank)."""

    def __init__(self, path, resume, overwrite, rank=0):
        self.path, self.resume, self.overwrite, self.rank = path, resume, overwrite, rank
        self.metrics_path = os.path.join(path, "metrics.jsonl")
        self.lock = None
        process.on_first_rank(self.check)

    def check(self):
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            die(f"--output_dir {self.path!r} is a file; pass a directory")
        if not os.path.exists(self.path):  # can it be made? asked of its nearest existing parent, nothing made
            parent = os.path.dirname(os.path.abspath(self.path))
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
                die(f"--output_dir {self.path!r} cannot be created ({parent} is not a writable directory); pass "
                    "another directory")  # fmt: skip
        elif not os.access(self.path, os.W_OK):
            die(f"--output_dir {self.path!r} is not writable; pass another directory")
        if os.path.isdir(self.path):
            self.lock = self.lock or lock_directory(self.path)
            self.check_no_earlier_run()

    def check_no_earlier_run(self):
        # an empty metrics.jsonl (a run that stopped before its first step) holds nothing to keep
        earlier = checkpoints(self.path) or (os.path.exists(self.metrics_path) and os.path.getsize(self.metrics_path))
        if earlier and not (self.resume or self.overwrite):
            die(
                f"--output_dir {self.path!r} holds an earlier run; pass --resume to continue it, "
                "--overwrite_output_dir to replace it, or another directory"
            )

    def resume_point(self, args, checkpoint=""):
        """(checkpoint path, trainer state) to continue from with --resume, else (None, None): `checkpoint` when
        given (--resume_from_checkpoint), else the newest readable one. Its saved flags must equal `args` except
        MAY_CHANGE_ON_RESUME."""
        if not self.resume:
            return None, None
        if checkpoint:
            if not os.path.isfile(os.path.join(checkpoint, "trainer_state.pt")):
                die(f"--resume_from_checkpoint {checkpoint!r}: no trainer_state.pt there; pass a checkpoint-N folder")
            path, state = newest_readable_checkpoint(checkpoint, report=self.rank == 0, only=checkpoint)
        else:
            path, state = newest_readable_checkpoint(self.path, report=self.rank == 0)
        if state is not None:
            check_same_run(state["args"], args, MAY_CHANGE_ON_RESUME)
        records = read_metrics(self.metrics_path)  # a damaged line stops the run now, before any model loads
        if state is None and records:  # nothing to continue from, and starting over would replace the records
            die(f"--resume: {self.path!r} holds {plural(len(records), 'step record')} but no checkpoint (a run with "
                "--save_steps 0 and --final_checkpoint false, or one stopped before its first checkpoint), so it "
                "cannot continue; pass --overwrite_output_dir to start it again, or another --output_dir")  # fmt: skip
        if state is None and self.rank == 0:
            print(f"--resume: no checkpoint in {self.path!r} yet: starting at step 0", flush=True)
        return path, state

    def open(self, start_step):
        """Create and lock the directory (rank 0); with overwrite, clear the old run; keep the metrics records up
        to start_step."""

        def create():
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as e:
                die(f"--output_dir {self.path!r} cannot be created ({e.strerror}); pass another directory")
            if self.lock is None:
                self.lock = lock_directory(self.path)
                self.check_no_earlier_run()
            for name in os.listdir(self.path):  # a crashed run's half-written checkpoints: the lock says none is ours
                if name.startswith((".tmp-checkpoint-", ".old-checkpoint-")):
                    print(f"removing {name}, left by a run that stopped while saving", flush=True)
                    shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
            if self.overwrite:
                for path in checkpoints(self.path):
                    shutil.rmtree(path)
                with suppress(FileNotFoundError):
                    os.remove(self.metrics_path)
            restart_metrics(self.metrics_path, start_step)

        process.on_first_rank(create)

    def checkpoint_path(self, step):
        return os.path.join(self.path, f"checkpoint-{step}")

    def save_checkpoint(self, policy, tokenizer, trainer_state, keep, weights=None):
        """model + tokenizer (save_pretrained, from the full `weights` when given) and the trainer state
        (optimizer, scheduler, step, args).

        - Written to a temporary directory unique to this process, then renamed: a crash never leaves a
          half-written checkpoint-N, and an existing checkpoint-N is replaced only once its successor is complete.
        - Keeps the newest `keep` checkpoints (0 = all).
        - The caller vouches for the weights: the update step stops the run when one is not finite."""
        final = self.checkpoint_path(trainer_state["step"])
        tmp, old = (
            os.path.join(self.path, f".{kind}-{os.path.basename(final)}-{os.getpid()}") for kind in ("tmp", "old")
        )
        try:
            policy.save_pretrained(tmp, state_dict=weights)
            tokenizer.save_pretrained(tmp)
            torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
            umask = os.umask(0)
            os.umask(umask)
            for name in os.listdir(tmp):  # one mode for every file (safetensors writes 0600): the umask's
                os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
                fsync(os.path.join(tmp, name))
        except BaseException as e:  # a full or read-only disk (torch and safetensors raise their own types), Ctrl-C
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays; earlier checkpoints are untouched
            if not isinstance(e, Exception):
                raise
            kept = checkpoints(self.path)
            before = f"{os.path.basename(kept[-1])} is intact" if kept else "no earlier checkpoint exists"
            cannot_write(final, e, f"{before}; free space and continue with --resume")
        if os.path.exists(final):
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        for path in checkpoints(self.path)[:-keep] if keep else []:
            shutil.rmtree(path, ignore_errors=True)


def lock_directory(path):
    """An exclusive lock on the directory itself (nothing is left behind), held until the process ends."""
    import fcntl

    lock = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        die(f"--output_dir {path!r} is in use by another run; wait for it or pass another directory")
    return lock


def newest_readable_checkpoint(output_dir, report=True, only=None):
    """(checkpoint path, trainer state) of the newest readable checkpoint (or of `only`), or (None, None). An
    unreadable one (torn trainer_state.pt, missing or corrupt weights) is skipped with a message."""
    from safetensors import safe_open

    for path in [only] if only else reversed(checkpoints(output_dir)):
        try:
            state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
            with safe_open(os.path.join(path, "model.safetensors"), "pt") as weights:
                for key in weights.keys():
                    weights.get_slice(key)
            return path, state
        except Exception as e:  # noqa: BLE001 - any failure to read means: not this checkpoint
            if only:
                reason = (str(e).splitlines() or [""])[0][:200]
                die(f"--resume_from_checkpoint {only!r} is unreadable ({type(e).__name__}: {reason}); pass another "
                    "checkpoint-N folder, or --resume alone for the newest readable one")  # fmt: skip
            if report:
                print(f"warning: {path} is unreadable ({type(e).__name__}: {e}); trying the one before", flush=True)
    if checkpoints(output_dir):
        die(f"--resume: no readable checkpoint in {output_dir!r}; run without --resume and with "
            "--overwrite_output_dir to start over")  # fmt: skip
    return None, None


def check_same_run(saved, current, may_change):
    """--resume continues the same run: every saved argument except those in may_change must be unchanged."""
    changed = [k for k in saved if k not in may_change and k in current and saved[k] != current[k]]
    if changed:
        diffs = ", ".join(f"--{k} {saved[k]!r} -> {current[k]!r}" for k in changed)
        die(f"--resume would make a different run ({diffs}); restore them or pass another --output_dir")


def read_metrics(path):
    """The records of a metrics.jsonl (null, an undefined value, reads as NaN). A torn last line (a crash
    mid-write) is dropped; a damaged line before it stops with one line naming it, so that nothing after it
    is ever lost."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines() if os.path.exists(path) else []
    except (OSError, UnicodeDecodeError) as e:
        die(f"{path}: not a readable metrics.jsonl ({type(e).__name__}); pass a run's output_dir/metrics.jsonl")
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a step record")
        except ValueError:
            if number == len(lines):
                break  # torn while being written
            die(f"{path}: line {number} of {len(lines)} is not a step record; repair or delete that line")
        records.append({key: math.nan if value is None else value for key, value in record.items()})
    return records


def strict_json(record):
    """One line of strict JSON (NaN and infinities, which strict readers reject, become null)."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(finite, allow_nan=False)


def restart_metrics(path, step):
    """Keep the records up to `step` (those after it will be redone), rewritten atomically."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    atomic_write(path, "".join(strict_json(r) + "\n" for r in kept))


# ----------------------------------------------------------------------------- writing files that stay whole
def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_space(path):
    """'1.2 GB free on /mount' for the filesystem that holds path (or its nearest existing parent)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    mount = probe
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    return f"{shutil.disk_usage(probe).free / 1e9:.2g} GB free on {mount}"


def cannot_write(path, error, then):
    """One line for a write that failed: what, why (the disk's free space, or the process's file-size limit),
    what is intact, what to do."""
    reason = getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0][:200]
    if getattr(error, "errno", None) == errno.EFBIG:  # the disk has room: `ulimit -f` is below the file's size
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        die(f"cannot write {path} (File too large: this process may write files of at most {limit / 1e9:.2g} GB, "
            f"ulimit -f); {then.replace('free space', 'raise the limit (ulimit -f unlimited)')}")  # fmt: skip
    die(f"cannot write {path} ({reason}; {free_space(path)}); {then}")


def plural(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "s")


def atomic_write(path, data, then="the previous file is intact; free space or pass another path"):
    """Write `data` (str or bytes) to `path` whole or not at all: a temporary file beside it, fsync, rename.
    A failure (full or read-only disk) removes the temporary file and ends with one line naming the disk."""
    tmp, data = f"{path}.tmp-{os.getpid()}", data if isinstance(data, bytes) else data.encode("utf-8")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        cannot_write(path, e, then)


def append_line(path, line):
    """Append one line and fsync; a failed append is cut back off, so the file never ends torn."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with suppress(OSError):
            os.truncate(path, size)
        cannot_write(path, e, "the records before this step are intact; free space and continue with --resume")


# ----------------------------------------------------------------------------- what a run was started on
SAMPLE = 1 << 20  # bytes hashed at the start, middle and end of a file
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt")
DATA_FILES = (".jsonl", ".parquet", ".arrow", ".csv")  # a --dataset folder's files


def file_fingerprint(path):
    """'size:sha256' of a file: of all of it up to 3 MiB, else of 1 MiB at its start, middle and end. Cheap for
    14B weights (9 MiB read per shard) and it changes whenever a file is replaced or edited, unless an edit
    keeps the size and falls between the sampled blocks."""
    size, digest = os.path.getsize(path), hashlib.sha256()
    with open(path, "rb") as f:
        for offset in [0] if size <= 3 * SAMPLE else [0, size // 2 - SAMPLE // 2, size - SAMPLE]:
            f.seek(offset)
            digest.update(f.read(SAMPLE if size > 3 * SAMPLE else size))
    return f"{size}:{digest.hexdigest()[:16]}"


def fingerprint(source):
    """{file: fingerprint} of a local file, or of a local folder's weight, config and tokenizer files (not its
    checkpoint-N/ subfolders); None for a hub id, whose content the hub keeps by revision."""
    if os.path.isfile(source):
        return {os.path.basename(source): file_fingerprint(source)}
    if not os.path.isdir(source):
        return None
    names = sorted(n for n in os.listdir(source) if n.endswith(WEIGHT_FILES + DATA_FILES) and not n.startswith("."))
    return {n: file_fingerprint(os.path.join(source, n)) for n in names if os.path.isfile(os.path.join(source, n))}


def input_fingerprints(model, dataset):
    return {"model": fingerprint(model), "dataset": fingerprint(dataset)}


def check_same_inputs(state, inputs, checkpoint):
    """--resume on a changed model or dataset (the reference would be reloaded from other weights, the prompts
    would be other prompts) is refused in one line naming what changed. Checkpoints written before fingerprints
    were kept, and hub ids, are not checked."""
    saved = (state or {}).get("inputs") or {}
    changed = []
    for what, flag in (("model", "--model"), ("dataset", "--dataset")):
        before, now = saved.get(what), inputs[what]
        if before is None or now is None or before == now:
            continue
        files = sorted(n for n in before.keys() | now.keys() if before.get(n) != now.get(n))
        changed.append(f"{flag} ({', '.join(files)})")
    if changed:
        die(f"--resume: {' and '.join(changed)} changed since the run began, so it would not continue the same run; "
            f"restore the files, or start a new run from {checkpoint} with --model {checkpoint}")  # fmt: skip


def interrupt_once():
    """The first Ctrl-C interrupts (KeyboardInterrupt); a second one would land inside the cleanup and print
    'Exception ignored ... KeyboardInterrupt' tracebacks, so from then on Ctrl-C is ignored (Ctrl-\\ and kill
    still end the process). A process started with Ctrl-C ignored (in the background) keeps ignoring it."""

    def first(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, first)


def interrupted(output_dir):
    """Ctrl-C: one line saying what the run kept and how to continue it (rank 0), exit status 130."""
    if int(os.environ.get("RANK", 0)) == 0:
        kept = checkpoints(output_dir)
        metrics, steps = os.path.join(output_dir, "metrics.jsonl"), 0
        with suppress(OSError, UnicodeDecodeError):
            steps = len(open(metrics, encoding="utf-8").read().splitlines()) if os.path.exists(metrics) else 0
        if not kept and not steps:
            said = "nothing was written yet; run the same command again"
        elif not kept:
            said = (f"{plural(steps, 'step record')} in {metrics} and no checkpoint yet, so the run cannot continue; "
                    "run the same command with --overwrite_output_dir to start it again")  # fmt: skip
        else:
            said = (f"kept {kept[-1]} (the newest checkpoint) and {plural(steps, 'step record')} in {metrics}; "
                    "continue with the same command and --resume")  # fmt: skip
        print(f"interrupted: {said}", file=sys.stderr, flush=True)
    raise SystemExit(130)
