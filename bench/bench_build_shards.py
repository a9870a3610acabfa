"""build_shards.py throughput per core against tokenization alone, a HF `tokenizers` BPE, 1 -> 2 workers, peak memory.

Run:
    python bench/bench_build_shards.py [--mb 24] [--vocab 8192] [--files 4] [--peak-mb 0] [--json out.json]
A corpus of real text (the Python standard library's sources, one document per module, repeated to --mb MB) is
written as --files Parquet files and as --files .jsonl.zst files; megatrain's tokenizer is trained on a sample.
Rows (tokens per CPU-second = per core; ratios are within this one run):
  * sentencepiece alone: encode of the same documents, one thread (plain encode, and the line-by-line encode the
    builder uses for megatrain's tokenizers)
  * build parquet / build jsonl.zst: data_tools/build_shards.py --workers 1 --threads 1 (reading, decompressing,
    parsing, hashing, encoding, writing tars), CPU seconds of the worker
  * HF tokenizers BPE of the same vocabulary size, trained on the same sample, encode_batch on one thread
  * scaling: wall-clock MB/s of --workers 2 --threads 1 over --workers 1 --threads 1 (units = files)
  * --peak-mb N: peak RSS of a build of one N MB Parquet file (a child process; its ru_maxrss)
The machine is shared: CPU seconds, not wall time, for the per-core rates; the scaling row is wall time and needs
the second core idle (say so when reporting).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def corpus_texts(mb: float) -> list[str]:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
    texts, size = [], 0
    while size < mb * 1e6:
        for f in files:
            try:
                t = open(f, encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            if t:
                texts.append(t + f"\n# copy {size}\n")  # distinct documents (no dedup in play)
                size += len(t.encode())
            if size >= mb * 1e6:
                break
    return texts


def write_inputs(texts, folder: str, files: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    os.makedirs(os.path.join(folder, "pq"))
    os.makedirs(os.path.join(folder, "zst"))
    per = -(-len(texts) // files)
    for i in range(files):
        part = texts[i * per:(i + 1) * per]
        pq.write_table(pa.table({"text": part}), os.path.join(folder, "pq", f"{i:03d}.parquet"))
        with open(os.path.join(folder, "zst", f"{i:03d}.jsonl.zst"), "wb") as f:
            f.write(zstandard.ZstdCompressor(level=3).compress(
                "".join(json.dumps({"text": t}) + "\n" for t in part).encode()))


def cpu_rate(fn) -> tuple[float, int]:
    t0 = time.process_time()
    n = fn()
    return time.process_time() - t0, n


def build(inputs: str, tok: str, out: str, workers: int) -> dict:
    """One build_shards run in a child process: wall seconds, the printed CPU rates, peak RSS."""
    cmd = [sys.executable, os.path.join(ROOT, "data_tools", "build_shards.py"), "--input", inputs, "--tokenizer", tok,
           "--out", out, "--workers", str(workers), "--threads", "1", "--unit-size", "1"]
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    timed = ["/usr/bin/time", "-f", "maxrss_kb=%M"] if os.path.exists("/usr/bin/time") else []
    p = subprocess.run(timed + cmd, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT, TQDM_DISABLE="1"))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss = [ln for ln in p.stderr.splitlines() if ln.startswith("maxrss_kb=")]
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("rate:")][-1]
    mb = float(line.split("rate: ")[1].split(" MB")[0])
    tokens = int(line.split("raw text, ")[1].split(" tokens")[0])
    per_cpu_tokens = float(line.rsplit("MB, ", 1)[1].split(" tokens")[0])
    per_cpu_mb = float(line.split("per CPU-second: ")[1].split(" MB")[0])
    return {"wall_s": wall, "mb": mb, "tokens": tokens, "tokens_per_cpu_s": per_cpu_tokens,
            "mb_per_cpu_s": per_cpu_mb, "mb_per_s_wall": mb / wall,
            "child_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "maxrss_mb": int(rss[-1].split("=")[1]) / 1024 if rss else None}  # the main process (GNU time)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=24.0, help="corpus size (raw text MB)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--files", type=int, default=4, help="input files per format (build units)")
    p.add_argument("--peak-mb", type=float, default=0.0,
                   help="also: peak RSS of a build of one Parquet file holding this many MB of text")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import sentencepiece  # noqa: F401
    from megatrain.data.tokenizer import TokenizerConfig, encode_documents, load_tokenizer, train_tokenizer

    tmp = tempfile.mkdtemp(prefix="bench_build_")
    texts = corpus_texts(a.mb)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    write_inputs(texts, tmp, a.files)
    tok = os.path.join(tmp, "tok")
    sample = texts[:max(1, len(texts) // 8)]
    train_tokenizer(sample, TokenizerConfig(vocab_size=a.vocab, num_threads=2, input_sentence_size=300_000), tok)
    sp = load_tokenizer(tok)
    rows = {"corpus_mb": mb, "docs": len(texts), "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}

    batches = [texts[i:i + 64] for i in range(0, len(texts), 64)]  # ~1 MB each, as the builder encodes
    s, n = cpu_rate(lambda: sum(len(x) for b in batches for x in sp.encode(b, num_threads=1)))
    rows["sentencepiece_plain"] = {"tokens_per_cpu_s": n / s, "mb_per_cpu_s": mb / s, "tokens": n}
    s, n = cpu_rate(lambda: sum(len(x) for b in batches for x in encode_documents(sp, b, 1, "uint16")))
    rows["sentencepiece_lines"] = {"tokens_per_cpu_s": n / s, "mb_per_cpu_s": mb / s, "tokens": n}

    os.environ["RAYON_NUM_THREADS"] = "1"  # read by tokenizers' thread pool when it starts (below)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=a.vocab, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    s, n = cpu_rate(lambda: sum(len(e.ids) for e in hf.encode_batch(texts)))
    rows["hf_tokenizers_bpe"] = {"tokens_per_cpu_s": n / s, "mb_per_cpu_s": mb / s, "tokens": n}

    for name, pattern in (("parquet", "pq/*.parquet"), ("jsonl_zst", "zst/*.jsonl.zst")):
        rows[f"build_{name}"] = build(os.path.join(tmp, pattern), tok, os.path.join(tmp, f"out_{name}"), 1)
    one = rows["build_parquet"]
    two = build(os.path.join(tmp, "pq/*.parquet"), tok, os.path.join(tmp, "out_parquet2"), 2)
    rows["build_parquet_2_workers"] = two
    rows["scaling_1_to_2_workers"] = one["wall_s"] / two["wall_s"] / 2
    ref = rows["sentencepiece_lines"]["tokens_per_cpu_s"]
    for name in ("parquet", "jsonl_zst"):
        rows[f"build_{name}_overhead_vs_sentencepiece"] = ref / rows[f"build_{name}"]["tokens_per_cpu_s"] - 1
    if a.peak_mb:
        import pyarrow as pa
        import pyarrow.parquet as pq
        big = os.path.join(tmp, "big", "big.parquet")
        os.makedirs(os.path.dirname(big))
        reps = max(1, int(a.peak_mb * 1e6 / (mb * 1e6)))
        with pq.ParquetWriter(big, pa.schema([("text", pa.string())])) as w:
            for r in range(reps):
                w.write_table(pa.table({"text": [t + f"#{r}" for t in texts]}), row_group_size=2000)
        rows["peak"] = dict(build(big, tok, os.path.join(tmp, "out_big"), 1), file_mb=os.path.getsize(big) / 1e6)
    rows["load_avg_end"] = os.getloadavg()
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(rows, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
