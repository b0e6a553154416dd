"""Grading a class: many hand-ins from people the grader does not control, one CSV row each.

``grade_class`` grades each submission in its own process with a time limit, two at a time on two
cores, and appends its row to the CSV as soon as it is known: a rerun skips the rows already there,
and a submission that is refused (a pickle that runs code, a zip bomb, a model that is no
MobileNetV2), crashes the runtime or runs out of time is a row with its reason, never the end of
the run. Every edition of the rules is scored from two measurements, each made once: the .pth
under torchvision's resize (the notebooks' evaluation) and the .pte under the runner's (the lab's
command); ``evaluate.grade`` measures both resizes of both files for one student.
"""
from __future__ import annotations

import csv
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from .errors import MobilepruneError, first_line

COLUMNS = ("id", "submission", "status", "reason", "mflops", "params", "model", "pth_accuracy", "pte_accuracy",
           "score_original", "score_revised", "score_2025", "notes", "seconds")
DEFAULT_TIME_LIMIT_S = 900  # a dense model's two passes at one thread take ~10 minutes on a 2-core Zen 4


# ----------------------------------------------------------------------------- what to grade
def find_submissions(paths: list[str | Path]) -> dict[str, Path]:
    """``{id: path}``: each zip, hand-in folder or .pth named, and the zips inside a folder of them.
    A submission's id is its file name without ``.zip`` (the lab names the zip by student id)."""
    found: dict[str, Path] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise MobilepruneError(f"{path}: no such file or folder")
        is_hand_in = path.is_file() or (path / "model" / "mobilenet.pth").is_file() or \
            (path / "mobilenet.pth").is_file()
        members = [path] if is_hand_in else sorted(path.glob("*.zip"))
        if not members:
            raise MobilepruneError(f"{path}: neither a hand-in nor a folder of zips")
        for member in members:
            sid = member.name.removesuffix(".zip") if member.suffix == ".zip" else member.stem
            if sid in found and found[sid] != member:
                raise MobilepruneError(f"two submissions have the id {sid!r}: {found[sid]} and {member}")
            found[sid] = member
    return found


def check_table(path: Path) -> set[str]:
    """The ids already graded in ``path`` (an earlier run's table); refuses a file that is not one,
    and a folder that cannot be written, before any grading starts."""
    if path.is_dir():
        raise MobilepruneError(f"{path}: is a folder; name the CSV file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as e:
        raise MobilepruneError(f"{path}: cannot be written ({e.strerror})") from None
    if path.stat().st_size == 0:
        return set()
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise MobilepruneError(f"{path}: not a table written by `mobileprune grade --csv`; name a new file")
        return {row["id"] for row in reader}


def append_row(path: Path, row: dict) -> None:
    """One whole line, flushed to disk: a run killed between rows leaves a table a rerun continues."""
    new = path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in COLUMNS})
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- one submission, in a worker
def _grade_worker(path: str, test_file: str, limit: int | None, workdir: str, conn) -> None:
    """Measure one submission, sending each result as soon as it is known: if the process dies or is
    killed (a .pte that aborts the runtime, the time limit), the parent keeps what came before."""
    import torch

    from .data import read_cifar_bin
    from .errors import quiet_libraries
    from .evaluate import count_mflops, missing_notebook, model_files, predict, unpack_submission
    from .models import changed_strides, describe_strides, load_pickled_model

    torch.set_num_threads(1)  # two submissions on two cores
    quiet_libraries()
    try:
        conn.send({"stage": "unpacking it"})
        root = unpack_submission(Path(path), Path(workdir))
        pth, pte = model_files(Path(path), root)
        conn.send({"stage": "loading the .pth"})
        model = load_pickled_model(pth)  # through the allowlist: nothing in it runs
        mflops, params = count_mflops(model)
        conn.send({"model": describe_strides(changed_strides(model)), "mflops": mflops, "params": params,
                   "stage": "evaluating the .pth"})
        images, labels = read_cifar_bin(test_file)
        images, labels = images[:limit], labels[:limit]
        found = (predict(model, images, "torchvision") == labels).float().mean().item()
        conn.send({"pth_accuracy": found})
        notes = missing_notebook(root)
        if pte.is_file():
            from .export import PteModel, set_runtime_threads

            conn.send({"stage": "evaluating the .pte"})
            set_runtime_threads(1)
            found = (predict(PteModel(pte), images, "runner") == labels).float().mean().item()
            conn.send({"pte_accuracy": found})
        else:
            notes.append("no .pte: scored under the revised and 2025 rules only")
        conn.send({"notes": notes, "status": "graded"})
    except MobilepruneError as e:
        conn.send({"status": "refused", "reason": str(e)})
    except Exception as e:  # noqa: BLE001 - a stranger's file may break anything; the row says what
        conn.send({"status": "failed", "reason": f"{type(e).__name__}: {first_line(e)}"})
    finally:
        conn.close()


def finish_row(sid: str, path: Path, found: dict, seconds: float, workdir: str) -> dict:
    """A CSV row from what a worker sent: the scores under each edition of the rules it allows."""
    from .evaluate import scores_by_rule

    row = {"id": sid, "submission": str(path), "seconds": round(seconds, 1), "status": found.get("status", "failed")}
    for key in ("mflops", "params", "model", "pth_accuracy", "pte_accuracy"):
        row[key] = found.get(key, "")
    if isinstance(row["mflops"], float):
        row["mflops"] = round(row["mflops"], 6)
        pth = {"torchvision": found["pth_accuracy"]} if "pth_accuracy" in found else None
        pte = {"runner": found["pte_accuracy"]} if "pte_accuracy" in found else None
        for rule, s in scores_by_rule(found["mflops"], pth, pte).items():
            row[f"score_{rule}"] = round(s["score"], 2)
    # Paths inside the worker's scratch folder mean nothing to the grader: name the submission instead.
    row["reason"] = found.get("reason", "").replace(workdir, path.name)
    row["notes"] = "; ".join(found.get("notes", []))
    return row


# ----------------------------------------------------------------------------- the class
def grade_class(paths: list[str | Path], table: str | Path, data: str | Path | None = None,
                limit: int | None = None, time_limit_s: float = DEFAULT_TIME_LIMIT_S, workers: int = 2,
                progress: bool = True, log=print) -> list[dict]:
    """Grade every submission in ``paths`` not yet in ``table`` (a CSV), ``workers`` at a time; return
    the table's rows (old and new). See the module's docstring."""
    import multiprocessing
    from multiprocessing.connection import wait

    from .data import TEST_BIN, find_data_dir, read_cifar_bin
    from .evaluate import not_the_lab_test_set

    table = Path(table)
    submissions = find_submissions(paths)
    done = check_table(table)
    test_file = find_data_dir(data) / TEST_BIN
    images, labels = read_cifar_bin(test_file)  # refuses a damaged test file (or labels out of range) first
    caveat = not_the_lab_test_set(images[:limit], labels[:limit], limit)
    todo = [(sid, path) for sid, path in submissions.items() if sid not in done]
    if done:
        log(f"{table}: {len(submissions) - len(todo)} of {len(submissions)} already graded; grading the rest")
    context = multiprocessing.get_context("spawn")
    scratch = Path(tempfile.mkdtemp(prefix="mobileprune-grade-"))
    running: dict = {}
    bar = tqdm(total=len(todo), desc="grading", unit="hand-in", disable=not progress)
    try:
        while todo or running:
            while todo and len(running) < workers:
                sid, path = todo.pop(0)
                workdir = scratch / sid
                workdir.mkdir()
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_grade_worker, args=(str(path), str(test_file), limit,
                                                                      str(workdir), send))
                process.start()
                send.close()  # the child's end: EOF here once the child has gone, however it went
                running[sid] = (path, process, receive, time.monotonic(), {}, str(workdir))
            wait([r[2] for r in running.values()] + [r[1].sentinel for r in running.values()], timeout=1)
            for sid in list(running):
                path, process, receive, started, found, workdir = running[sid]
                alive, elapsed = process.is_alive(), time.monotonic() - started
                _drain(receive, found)
                if alive and elapsed <= time_limit_s:
                    continue
                if alive:
                    process.kill()
                    found.update(status="failed", reason=f"took more than {time_limit_s:g} s "
                                                         f"(--time-limit) while {found.get('stage', 'starting')}")
                process.join()
                _drain(receive, found)  # what it sent between the check above and its end
                if "status" not in found:
                    found.update(status="failed", reason=f"its grading process died (exit code {process.exitcode}) "
                                                         f"while {found.get('stage', 'starting')}")
                receive.close()
                row = finish_row(sid, path, found, elapsed, workdir)
                append_row(table, row)
                shutil.rmtree(workdir, ignore_errors=True)
                del running[sid]
                bar.update(1)
                bar.set_postfix_str(f"{sid}: {row['status']}")
    finally:
        for _, process, *_ in running.values():
            process.kill()
        bar.close()
        shutil.rmtree(scratch, ignore_errors=True)
    rows = read_table(table)
    log(format_summary(rows, caveat))
    return rows


def _drain(receive, found: dict) -> None:
    try:
        while receive.poll():
            found.update(receive.recv())
    except (EOFError, OSError):  # the worker has gone: what it sent is all there is
        pass


def read_table(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def format_summary(rows: list[dict], caveat: str | None = None) -> str:
    """How many were graded, refused or failed, and each edition's score distribution."""
    from .evaluate import RULES

    counts = {status: sum(r["status"] == status for r in rows) for status in ("graded", "refused", "failed")}
    lines = [f"{len(rows)} submissions: " + ", ".join(f"{n} {status}" for status, n in counts.items())]
    for rules in RULES:
        scores = sorted(float(r[f"score_{rules.name}"]) for r in rows if r[f"score_{rules.name}"] not in ("", None))
        if not scores:
            continue
        full = sum(s >= 45 for s in scores)
        lines.append(f"  {rules.name:<9} {len(scores):>3} scored: min {scores[0]:.1f}, median "
                     f"{statistics.median(scores):.1f}, max {scores[-1]:.1f} %; {full} at full marks (>= 45)")
    if caveat:
        lines.append(f"NOT THE LAB'S SCORES: {caveat}")
    return "\n".join(lines)
