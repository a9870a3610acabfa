"""A tiny real training run for the export tests: tokenizer (sentencepiece, 320 pieces) -> shards -> 2 steps of
launch/pretrain.py under `deepspeed --num_gpus 2` (2 CPU ranks, ZeRO-3, sequence parallel 2). ~40 s on 2 cores.

    from tests.export.run_fixture import make_run
    run_dir, tok_dir = make_run(tmp_dir)            # run_dir/checkpoints/step00000002, run_dir/metrics.jsonl
    run_dir, tok_dir = make_run(tmp_dir, config="megalodon_tiny.yaml")   # a Megalodon run
    python -m tests.export.run_fixture OUT_DIR [CONFIG]     # the same by hand
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 320
TEXT = ["The quick brown fox jumps over the lazy dog. " * 3 + "def f(x):\n\treturn x + 1\n",
        "Naïve café — 東京 🚀; numbers 12345 and 6789.\n  indented line\n",
        "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 2]


def _run(cmd, env=None, timeout=300):
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


def make_run(base: str, zero: int = 3, sp: int = 2, objective: str = "clm",
             config: str = "tiny.yaml") -> tuple[str, str]:
    from megatrain.data.tokenizer import TokenizerConfig, train_tokenizer
    from megatrain.parallel.env import find_launcher, free_port
    corpus, tok, shards, run = (os.path.join(base, d) for d in ("corpus", "tokenizer", "shards", "run"))
    os.makedirs(corpus, exist_ok=True)
    for i in range(40):  # enough text for 320 pieces and a few windows of 32 tokens
        with open(os.path.join(corpus, f"doc{i:02d}.txt"), "w") as f:
            f.write(TEXT[i % len(TEXT)] + f"document {i}\n")
    train_tokenizer((open(os.path.join(corpus, n)).read() for n in sorted(os.listdir(corpus))),
                    TokenizerConfig(vocab_size=VOCAB, num_threads=1), tok)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    _run([sys.executable, "data_tools/build_shards.py", "--input", corpus, "--tokenizer", tok, "--out", shards],
         env)
    launcher = find_launcher("deepspeed")
    if launcher is None:
        raise RuntimeError("deepspeed launcher not found: pip install -e '.[dev]'")
    # data.tokenizer is left unset on purpose: export must find the tokenizer through the shards' manifest
    _run([launcher, "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
          "--config", os.path.join(ROOT, "configs", config), f"data.shards={shards}/index.json",
          f"run_dir={run}", f"model.vocab_size={VOCAB}", "train.max_steps=2", f"parallel.zero_stage={zero}",
          f"parallel.sequence_parallel_size={sp}", f"train.objective={objective}", "logging.tensorboard=false"],
         env, timeout=400)
    return run, tok


if __name__ == "__main__":
    print(make_run(sys.argv[1], config=sys.argv[2] if len(sys.argv) > 2 else "tiny.yaml"))
