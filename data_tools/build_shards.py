"""Tokenize documents into webdataset tar shards plus an index.json manifest, on one machine or a Slurm array.

Run:
    python data_tools/build_shards.py --input 'corpus/*.txt' --tokenizer tok/ --out shards/ [--shard-size 256MB]
        [--workers 2] [--heldout-fraction 0.01 | --heldout-docs 100] [--min-chars 200] [--dedup]
    python data_tools/build_shards.py --input 's3://bucket/fineweb/**/*.parquet' --text-field text \
        --where "language == 'en'" --tokenizer llama/tokenizer.model --out s3://bucket/shards/fineweb/
    # a cluster: N array tasks, then one merge (launch/slurm/build_shards.sbatch does both)
    python data_tools/build_shards.py ARGS --num-tasks 8 --task-index I      # I = 0..7 (or SLURM_ARRAY_TASK_ID)
    python data_tools/build_shards.py ARGS --merge                          # the same ARGS: writes index.json

Inputs (megatrain/data/text.py): .parquet (column --text-field), .jsonl / .json lines, plain text, a `datasets`
save_to_disk folder, each optionally .gz/.bz2/.xz/.zst/.zstd; local paths, folders, globs, s3:// and https:// URLs
and s3:// globs. Every input is streamed (memory: a batch of --batch-mb MB of text per worker, or one Parquet row
group). Filters: --min-chars, --where (a condition on other columns / JSON fields), --dedup (exact duplicates by
the sha256 of the text, the hash the held-out split uses; the first copy in input order stays); each is counted,
printed and stored in index.json "stats". Empty documents are dropped; invalid UTF-8 is replaced (default) or the
document rejected (--invalid-utf8 reject). Near-duplicate detection is not done here (README: Data).
--tokenizer: any sentencepiece model (a folder with tokenizer.model, or the .model file); its own special ids
(unk/bos/eos/pad/mask, whichever it has) are recorded in the manifest and followed by training, evaluation and
export; eos is the end-of-document token.

One sample per document (format: megatrain/data/shards.py). A document larger than --shard-size is still one
sample, in a shard of its own. Output bytes depend only on the inputs, the tokenizer and these settings, never on
--workers, --num-tasks or which task ran what (the partition rule: megatrain/data/build.py): the inputs are cut into
units of consecutive whole files of at most --unit-size input bytes, a shard never spans two units, and the merge
numbers the shards in unit order. --workers N builds N units at a time in N processes (sentencepiece threads share
the CPUs); task I of --num-tasks N builds the units u with u % N == I into OUT/_parts/ (each unit's part.json
written last; a finished unit is not rebuilt when a task is rerun) and --merge writes the manifests.
--out: a local folder (new, empty or an earlier build, replaced whole: a single-task build is written to a temporary
sibling and renamed at the end) or an s3:// prefix (each shard one whole PUT, index.json last). A failed or killed
build leaves no index.json: nothing half-written is ever read.
Held-out split (for megatrain/eval): by document, decided by a hash of the document's text (sha256), so it does not
depend on input order, worker or task count and identical documents fall on the same side: with --heldout-fraction
F a document is held out when its hash, read as a number in [0, 1), is below F; with --heldout-docs N the N
documents of smallest hash are (a first pass reads every input; every task of an array makes that pass).
Held-out documents go to OUT/heldout/ (its own shards + index.json), the rest to OUT/. Both manifests record the
split ("split"), each document's UTF-8 byte count ("doc_bytes") and the UTF-8 bytes of every token id
("token_bytes": bits per byte).
Bad input (missing tokenizer or a file that is not sentencepiece, an input that does not exist or matches nothing,
a Parquet file without the column, a corrupt compressed file, a 403, a size like "lots", --task-index >=
--num-tasks, a merge with a missing part): one line naming it, exit 2.
Prints documents, tokens and the rate: MB/s and tokens/s, and both per CPU-second (per core).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from megatrain.cli import ArgumentParser, output_folder, run  # noqa: E402
from megatrain.data.build import (HELDOUT_DIR, PARTS_DIR, UnitJob, build_unit, doc_hash_bytes, merge,  # noqa: E402
                                  plan_units, read_part, unit_name)
from megatrain.data.build import doc_hash  # noqa: E402,F401 - the held-out rule, as tests and users call it
from megatrain.data.remote import exists, is_remote, join  # noqa: E402
from megatrain.data.shards import FORMAT, MANIFEST_NAME, VERSION  # noqa: E402
from megatrain.data.text import TextConfig, expand_inputs, input_size, iter_documents  # noqa: E402
from megatrain.data.tokenizer import (load_tokenizer, special_token_ids, token_byte_lengths,  # noqa: E402
                                      tokenizer_sha256)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, flag: str = "--shard-size") -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) * _UNITS[m.group(2).upper()] < 1:
        raise ValueError(f"{flag} {text!r}: expected a positive size such as 256MB, 1GB, 500KB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, globs, folders, s3:// or https:// URLs")
    p.add_argument("--tokenizer", required=True, help="sentencepiece model: a folder with tokenizer.model, or the file")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix for shard-*.tar and index.json")
    p.add_argument("--shard-size", default="256MB", help="target tar size (default 256MB)")
    p.add_argument("--unit-size", default="1GB",
                   help="input bytes per build unit (default 1GB): a shard never spans two units")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="units built at once, each in its own process (default: the CPU count)")
    p.add_argument("--threads", type=int, default=None,
                   help="sentencepiece threads per worker (default: the CPU count / --workers)")
    p.add_argument("--text-field", default=TextConfig.text_field, help="JSON field / Parquet column holding the text")
    p.add_argument("--invalid-utf8", default=TextConfig.invalid_utf8, choices=["replace", "reject"])
    p.add_argument("--min-chars", type=int, default=0, help="drop documents with fewer characters")
    p.add_argument("--where", default=None, help="keep records matching this condition, e.g. \"language == 'en'\"")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents (sha256 of the text)")
    p.add_argument("--batch-mb", type=float, default=1.0, help="text encoded per batch")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--heldout-fraction", type=float, default=None,
                      help="hold out this fraction of the documents (by a hash of each document) in OUT/heldout/")
    held.add_argument("--heldout-docs", type=int, default=None,
                      help="hold out this many documents (those of smallest hash) in OUT/heldout/")
    p.add_argument("--num-tasks", type=int, default=None, help="tasks of an array build (default: "
                   "SLURM_ARRAY_TASK_COUNT, else 1)")
    p.add_argument("--task-index", type=int, default=None, help="this task, 0..num-tasks-1 (default: "
                   "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)")
    p.add_argument("--merge", action="store_true", help="write the manifests from the finished parts in --out")
    return p.parse_args(argv)


def _tasks(a) -> tuple[int, int]:
    """(num_tasks, task_index): the flags, else the Slurm array's variables, else (1, 0)."""
    n, i = a.num_tasks, a.task_index
    env = os.environ
    if n is None and i is None and "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env and not a.merge:
        n = int(env["SLURM_ARRAY_TASK_COUNT"])
        i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    n = 1 if n is None else n
    if n < 1:
        raise ValueError(f"--num-tasks {n}: expected a positive number of tasks")
    if i is None:
        if n > 1 and not a.merge:
            raise ValueError(f"--num-tasks {n}: give --task-index (0..{n - 1}) or run inside a Slurm array")
        i = 0
    if not 0 <= i < n:
        raise ValueError(f"--task-index {i}: expected 0 <= --task-index < --num-tasks = {n}")
    return n, i


def _validate(a) -> None:
    parse_size(a.shard_size)
    parse_size(a.unit_size, "--unit-size")
    if a.workers < 1:
        raise ValueError(f"--workers {a.workers}: expected a positive number of worker processes")
    if a.threads is not None and a.threads < 1:
        raise ValueError(f"--threads {a.threads}: expected a positive number of threads")
    if not a.batch_mb > 0:
        raise ValueError(f"--batch-mb {a.batch_mb}: expected a positive size in MB")
    if a.heldout_fraction is not None and not 0 < a.heldout_fraction < 1:
        raise ValueError(f"--heldout-fraction {a.heldout_fraction}: expected a fraction strictly between 0 and 1")
    if a.heldout_docs is not None and a.heldout_docs < 1:
        raise ValueError(f"--heldout-docs {a.heldout_docs}: expected a positive number of documents")


def heldout_cut(files, text_cfg, n_docs: int, dedup: bool) -> float:
    """The hash below or at which a document is held out, for --heldout-docs N (a first pass over the text)."""
    hashes = [doc_hash_bytes(t) for _, _, t in iter_documents(files, text_cfg, {})]
    if dedup:
        hashes = list(set(hashes))
    values = sorted(int.from_bytes(h[:8], "big") / 2.0 ** 64 for h in hashes)
    if values and n_docs >= len(values):
        raise ValueError(f"--heldout-docs {n_docs}: the input has only {len(values)} "
                         f"{'distinct ' if dedup else ''}non-empty documents; leave some for training")
    return values[n_docs - 1] if values else 0.0


def _earlier_build(names: list[str]) -> bool:
    """An --out folder this tool wrote before: index.json plus shard files (and a heldout/ folder) only."""
    return MANIFEST_NAME in names and all(n in (MANIFEST_NAME, HELDOUT_DIR) or n.startswith("shard-") for n in names)


def _fingerprint(files, sizes, a, tok_sha: str, text: dict, split: dict) -> str:
    """Everything that decides the output bytes: parts of another build are refused by the merge."""
    body = json.dumps({"format": [FORMAT, VERSION], "inputs": list(zip(files, sizes)), "tokenizer": tok_sha,
                       "shard_bytes": parse_size(a.shard_size), "unit_bytes": parse_size(a.unit_size, "--unit-size"),
                       "text": text, "split": split, "dedup": a.dedup}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _run_units(jobs: list[UnitJob], workers: int) -> list[dict]:
    """Build the units, ``workers`` at a time in worker processes (one: in this process)."""
    bar = tqdm(total=len(jobs), unit="unit", desc="building", disable=None)
    results = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(build_unit(job))
                bar.update()
            return results
        # spawn, not fork: fsspec/s3fs run an event loop thread that a fork would copy mid-flight
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for res in pool.map(build_unit, jobs):
                results.append(res)
                bar.update()
        return results
    finally:
        bar.close()


def _print_summary(out: str, man, held, stats: dict, invalid_utf8: str) -> None:
    print(f"wrote {len(man.shards)} shards, {man.docs} documents, {man.tokens} tokens to {out}")
    if held is not None:
        print(f"held out {held.docs} documents, {held.tokens} tokens in {join(out, HELDOUT_DIR)}")
    print(f"empty documents: {stats.get('empty', 0)}, invalid UTF-8 documents ({invalid_utf8}d): "
          f"{stats.get('invalid_utf8', 0)}")
    dropped = {k: stats[k] for k in ("short", "filtered", "duplicates") if stats.get(k)}
    if dropped:
        print("dropped by the filters: " + ", ".join(f"{k} {v}" for k, v in dropped.items()))


def main(argv=None) -> int:
    a = parse_args(argv)
    _validate(a)  # every check before any work
    num_tasks, task_index = _tasks(a)
    text = {"text_field": a.text_field, "invalid_utf8": a.invalid_utf8, "min_chars": a.min_chars, "where": a.where}
    text_cfg = TextConfig(**text)
    files = expand_inputs(a.input)
    try:
        sp = load_tokenizer(a.tokenizer)
        specials = special_token_ids(sp)
    except ValueError as e:
        raise ValueError(f"--tokenizer {a.tokenizer}: {e}") from None
    sizes = [input_size(f) for f in files]
    units = plan_units(sizes, parse_size(a.unit_size, "--unit-size"))
    split: dict = {}
    if a.heldout_fraction is not None:
        split = {"rule": "sha256(utf-8 text)[:8] / 2**64 < heldout_fraction", "heldout_fraction": a.heldout_fraction}
    elif a.heldout_docs is not None:
        split = {"rule": "the heldout_docs_requested documents of smallest sha256(utf-8 text)[:8]",
                 "heldout_docs_requested": a.heldout_docs}
    tok_sha = tokenizer_sha256(a.tokenizer)
    fingerprint = _fingerprint(files, sizes, a, tok_sha, text, split)
    fields = {"vocab_size": sp.vocab_size(), "special_tokens": specials, "tokenizer_sha256": tok_sha,
              "token_bytes": token_byte_lengths(sp), "split": split}
    single = num_tasks == 1 and not a.merge
    out_remote = is_remote(a.out)
    if not single or out_remote:
        if exists(join(a.out, MANIFEST_NAME)):
            raise ValueError(f"--out {a.out}: holds a finished build ({MANIFEST_NAME}); choose a new folder or "
                             f"prefix (a one-task local build replaces an earlier one whole)")
    if a.merge:
        man, held = merge(a.out, len(units), fingerprint, fields, dedup=a.dedup, num_tasks=num_tasks,
                          check=lambda m, h: _check_nonempty(a, m, h, len(files)))
        _print_summary(a.out, man, held, man.stats, a.invalid_utf8)
        return 0

    cut = heldout_cut(files, text_cfg, a.heldout_docs, a.dedup) if a.heldout_docs is not None else None
    mine = [u for u in range(len(units)) if u % num_tasks == task_index]
    workers = min(a.workers, max(1, len(mine)))
    threads = a.threads or max(1, (os.cpu_count() or 1) // workers)

    def jobs_for(out: str) -> list[UnitJob]:
        todo = []
        for u in mine:
            part = join(out, PARTS_DIR, unit_name(u))
            if not single and read_part(part, fingerprint) is not None:
                continue  # finished by an earlier run of this task
            todo.append(UnitJob(unit=u, part=part, files=[files[i] for i in units[u]], text=text,
                                tokenizer=a.tokenizer, shard_bytes=parse_size(a.shard_size),
                                heldout_fraction=a.heldout_fraction, heldout_cut=cut, dedup=a.dedup,
                                fingerprint=fingerprint, threads=threads, batch_bytes=int(a.batch_mb * 1e6)))
        return todo

    t0 = time.time()
    if single and not out_remote:
        with output_folder(a.out, "--out", replaceable=_earlier_build) as tmp:
            results = _run_units(jobs_for(tmp), workers)
            man, held = merge(tmp, len(units), fingerprint, fields, dedup=a.dedup,
                              check=lambda m, h: _check_nonempty(a, m, h, len(files)))
    else:
        results = _run_units(jobs_for(a.out), workers)
        if single:
            man, held = merge(a.out, len(units), fingerprint, fields, dedup=a.dedup,
                              check=lambda m, h: _check_nonempty(a, m, h, len(files)))
    dt = max(time.time() - t0, 1e-9)
    stats: dict = {}
    for r in results:
        for k, v in r["stats"].items():
            stats[k] = stats.get(k, 0) + v
    mb, tokens = stats.get("bytes_in", 0) / 1e6, sum(r["tokens"] for r in results)
    cpu = max(sum(r["cpu_s"] for r in results), 1e-9)
    if single:
        _print_summary(a.out, man, held, man.stats, a.invalid_utf8)
    else:
        done = sum(read_part(join(a.out, PARTS_DIR, unit_name(u)), fingerprint) is not None
                   for u in range(len(units)))
        print(f"task {task_index} of {num_tasks}: built {len(results)} of its {len(mine)} units ({tokens} tokens); "
              f"{done} of {len(units)} units done in all; when all are, run the same command with --merge")
    # CPU seconds as well: on a shared machine the wall-clock rate mostly measures the neighbours.
    print(f"rate: {mb:.2f} MB raw text, {tokens} tokens in {dt:.2f}s = {mb / dt:.2f} MB/s, {tokens / dt:.0f} "
          f"tokens/s ({workers} workers x {threads} threads); per CPU-second: {mb / cpu:.2f} MB, "
          f"{tokens / cpu:.0f} tokens")
    return 0


def _check_nonempty(a, man, held, n_files: int) -> None:
    if not man.shards and (held is None or not held.shards):
        s = man.stats
        raise ValueError(f"--input {' '.join(a.input)}: no non-empty document in {n_files} files "
                         f"({s.get('empty', 0)} empty, {s.get('invalid_utf8', 0)} rejected as invalid UTF-8"
                         + "".join(f", {s[k]} {k}" for k in ("short", "filtered", "duplicates") if s.get(k)) + ")")
    if held is not None and (not held.shards or not man.shards):
        raise ValueError(f"--heldout-{'fraction' if a.heldout_fraction is not None else 'docs'}: the split "
                         f"leaves {'no held-out' if not held.shards else 'no training'} document "
                         f"({man.docs + held.docs} documents in all)")


if __name__ == "__main__":
    sys.exit(run(main, "build_shards"))
