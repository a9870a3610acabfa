"""Bad input at every entry point, as a user types it: one line on stderr naming the key/file/value and what is
expected, exit code 2, no traceback, nothing half-written, printed once under a multi-rank launcher.

Run: PYTHONPATH=. python -m pytest -q tests/test_bad_input.py            (the deepspeed cases are marked slow)
Each case is a row of CASES: (id, command, strings the error must contain, paths that must not exist after).
Commands and paths are templates filled from the `world` fixture: {py} this interpreter, {tools} data_tools/,
{pretrain} launch/pretrain.py, {sbatch} launch/slurm/pretrain.sbatch, {export} launch/export_hf.py, {tiny}
configs/tiny.yaml, {megalodon} configs/megalodon_tiny.yaml, {w} the shared fixture folder (inputs, a tokenizer, shards, a truncated copy; {w}/export: a
checkpoint, made only for the export cases), {out} a fresh folder per case for outputs.
"""
import contextlib
import os
import shutil
import subprocess
import sys

import pytest

from tests.tiny_data import MEGALODON_TINY, TINY, write_shards
from tests.dist_util import PRETRAIN, ROOT, free_port, pretrain_env
from tests.data.servers import http_server

FORBIDDEN: list = []  # the 403 server's URL, set by the `world` fixture

TOOLS = os.path.join(ROOT, "data_tools")
SBATCH = os.path.join(ROOT, "launch", "slurm", "pretrain.sbatch")
EXPORT = os.path.join(ROOT, "launch", "export_hf.py")
EVALUATE = os.path.join(ROOT, "launch", "evaluate.py")
BAKEOFF = os.path.join(ROOT, "bench", "bakeoff.py")
NOT_SP = ("data.seq_len",)  # SP 3 on 2 ranks must blame the world size, not the sequence length

DEMO = "{py} {tools}/demo_corpus.py"
TOK = "{py} {tools}/train_tokenizer.py"
BUILD = "{py} {tools}/build_shards.py --tokenizer {w}/tok"
INSPECT = "{py} {tools}/inspect_shards.py"
PRE = "{py} {pretrain} --config {tiny} data.shards={w}/shards/index.json run_dir={out}/run"
MLO = "{py} {pretrain} --config {megalodon} data.shards={w}/shards/index.json run_dir={out}/run"   # model_type megalodon
# data.sources values without spaces (the command is split on whitespace); {{ }} survive the template filling
SOURCE = 'data.sources=[{{{{"name":"{name}","shards":"{{w}}/shards/index.json","weight":{weight}}}}}]'
SOURCES2 = ('data.sources=[{{{{"name":"{a}","shards":"{{w}}/shards/index.json"}}}},'
            '{{{{"name":"{b}","shards":"{{w}}/shards/index.json"}}}}]')

# (id, command, must appear in the error line, must not exist afterwards)
CASES = [
    # ---- data_tools/demo_corpus.py
    ("demo-limit-zero", DEMO + " --out {out}/c --limit 0", ["--limit 0", "positive"], ["{out}/c"]),
    ("demo-limit-lots", DEMO + " --out {out}/c --limit lots", ["--limit", "'lots'"], ["{out}/c"]),
    ("demo-no-out", DEMO, ["--out"], []),
    ("demo-out-is-file", DEMO + " --out {w}/afile.txt --limit 1", ["afile.txt", "not a folder"], []),
    ("demo-out-not-empty", DEMO + " --out {w}/full --limit 1", ["full", "not empty"], []),
    # ---- data_tools/train_tokenizer.py
    ("tok-vocab-zero", TOK + " --input {w}/text --vocab-size 0 --out {out}/t", ["--vocab-size 0", "300"],
     ["{out}/t"]),
    ("tok-vocab-lots", TOK + " --input {w}/text --vocab-size lots --out {out}/t", ["--vocab-size", "'lots'"],
     ["{out}/t"]),
    ("tok-vocab-too-big", TOK + " --input {w}/text --vocab-size 60000 --out {out}/t",
     ["--vocab-size 60000", "does not fit"], ["{out}/t"]),
    ("tok-missing-input", TOK + " --input {w}/nowhere.txt --vocab-size 300 --out {out}/t", ["nowhere.txt"],
     ["{out}/t"]),
    ("tok-glob-no-match", TOK + " --input {w}/*.none --vocab-size 300 --out {out}/t", ["*.none", "matches no files"],
     ["{out}/t"]),
    ("tok-empty-input", TOK + " --input {w}/empty.txt --vocab-size 300 --out {out}/t", ["empty.txt", "no text"],
     ["{out}/t"]),
    ("tok-corrupt-gz", TOK + " --input {w}/corrupt.txt.gz --vocab-size 300 --out {out}/t", ["corrupt.txt.gz"],
     ["{out}/t"]),
    ("tok-bad-json", TOK + " --input {w}/bad.jsonl --vocab-size 300 --out {out}/t", ["bad.jsonl:1", "invalid JSON"],
     ["{out}/t"]),
    ("tok-no-field", TOK + " --input {w}/other.jsonl --vocab-size 300 --out {out}/t", ["other.jsonl:1", "'text'"],
     ["{out}/t"]),
    ("tok-negative-threads", TOK + " --input {w}/text --vocab-size 300 --threads -1 --out {out}/t",
     ["--threads -1"], ["{out}/t"]),
    ("tok-out-not-empty", TOK + " --input {w}/text --vocab-size 300 --out {w}/full", ["full", "not empty"], []),
    # ---- data_tools/build_shards.py
    ("build-missing-tokenizer", "{py} {tools}/build_shards.py --tokenizer {w}/no_tok --input {w}/text --out {out}/s",
     ["--tokenizer", "no_tok", "tokenizer.model"], ["{out}/s"]),
    ("build-not-a-tokenizer", "{py} {tools}/build_shards.py --tokenizer {w}/fake_tok --input {w}/text --out {out}/s",
     ["fake_tok", "not a sentencepiece model"], ["{out}/s"]),
    ("build-shard-size-lots", BUILD + " --input {w}/text --out {out}/s --shard-size lots",
     ["--shard-size 'lots'", "256MB"], ["{out}/s"]),
    ("build-shard-size-zero", BUILD + " --input {w}/text --out {out}/s --shard-size 0KB", ["--shard-size '0KB'"],
     ["{out}/s"]),
    ("build-negative-workers", BUILD + " --input {w}/text --out {out}/s --workers -2", ["--workers -2"], ["{out}/s"]),
    ("build-workers-lots", BUILD + " --input {w}/text --out {out}/s --workers lots", ["--workers", "'lots'"],
     ["{out}/s"]),
    ("build-batch-mb-zero", BUILD + " --input {w}/text --out {out}/s --batch-mb 0", ["--batch-mb 0"], ["{out}/s"]),
    ("build-missing-input", BUILD + " --input {w}/nowhere.txt --out {out}/s", ["nowhere.txt"], ["{out}/s"]),
    ("build-empty-input", BUILD + " --input {w}/empty.txt --out {out}/s", ["empty.txt", "no non-empty document"],
     ["{out}/s"]),
    ("build-out-not-empty", BUILD + " --input {w}/text --out {w}/full", ["full", "not empty"], []),
    ("build-out-is-file", BUILD + " --input {w}/text --out {w}/afile.txt", ["afile.txt", "not a folder"], []),
    ("build-bad-utf8-choice", BUILD + " --input {w}/text --out {out}/s --invalid-utf8 ignore",
     ["--invalid-utf8", "'ignore'"], ["{out}/s"]),
    ("build-heldout-fraction-one", BUILD + " --input {w}/text --out {out}/s --heldout-fraction 1",
     ["--heldout-fraction 1", "between 0 and 1"], ["{out}/s"]),
    ("build-heldout-docs-all", BUILD + " --input {w}/text --out {out}/s --heldout-docs 4",
     ["--heldout-docs 4", "only 4", "leave some for training"], ["{out}/s"]),
    ("build-heldout-both", BUILD + " --input {w}/text --out {out}/s --heldout-docs 1 --heldout-fraction 0.5",
     ["--heldout-fraction", "not allowed with"], ["{out}/s"]),
    ("build-parquet-no-column", BUILD + " --input {w}/nocol.parquet --out {out}/s", ["nocol.parquet",
     "no column 'text'", "--text-field"], ["{out}/s"]),
    ("build-where-no-column", BUILD + " --input {w}/nocol.parquet --text-field body --where lang=='en' --out {out}/s",
     ["nocol.parquet", "no column 'lang'", "--where"], ["{out}/s"]),
    ("build-where-not-a-condition", BUILD + " --input {w}/text --where len(text)>3 --out {out}/s",
     ["--where", "len(text)"], ["{out}/s"]),
    ("build-corrupt-zst", BUILD + " --input {w}/corrupt.jsonl.zst --out {out}/s", ["corrupt.jsonl.zst", "unreadable"],
     ["{out}/s"]),
    ("build-403", BUILD + " --input {forbidden}forbidden.jsonl --out {out}/s", ["forbidden.jsonl", "HTTP 403"],
     ["{out}/s"]),
    ("build-task-index-too-big", BUILD + " --input {w}/text --out {out}/s --num-tasks 2 --task-index 2",
     ["--task-index 2", "--num-tasks = 2"], ["{out}/s"]),
    ("build-merge-missing-part", BUILD + " --input {w}/text --out {w}/halfbuilt --unit-size 1 --num-tasks 2 --merge",
     ["halfbuilt/_parts/u000001/part.json", "missing", "--task-index 1"], ["{w}/halfbuilt/index.json"]),
    ("build-min-chars-negative", BUILD + " --input {w}/text --out {out}/s --min-chars -1", ["--min-chars -1"],
     ["{out}/s"]),
    # ---- data_tools/inspect_shards.py
    ("inspect-missing", INSPECT + " {w}/nowhere", ["nowhere", "not found"], []),
    ("inspect-not-json", INSPECT + " {w}/notjson", ["notjson", "unreadable"], []),
    ("inspect-wrong-format", INSPECT + " {w}/wrongformat", ["wrongformat", "not a megatrain-shards manifest"], []),
    ("inspect-truncated", INSPECT + " {w}/truncated", ["shard-000001.tar", "bytes on disk but the manifest records"],
     []),
    ("inspect-missing-tokenizer", INSPECT + " {w}/shards --tokenizer {w}/no_tok", ["no_tok", "tokenizer.model"], []),
    ("inspect-negative-chars", INSPECT + " {w}/shards --chars -1", ["--chars -1"], []),
    # ---- launch/pretrain.py, one process
    ("pretrain-no-config", "{py} {pretrain}", ["--config"], []),
    ("pretrain-missing-config", "{py} {pretrain} --config {w}/nowhere.yaml", ["nowhere.yaml"], []),
    ("pretrain-unknown-key", PRE + " train.lrr=1", ["unknown config key 'train.lrr'"], ["{out}/run"]),
    ("pretrain-steps-lots", PRE + " train.max_steps=lots", ["train.max_steps", "'lots'"], ["{out}/run"]),
    ("pretrain-lanes-zero", PRE + " data.lanes=0", ["data.lanes=0"], ["{out}/run"]),
    ("pretrain-malloc-missing", "env MEGATRAIN_MALLOC={w}/no/libtcmalloc.so " + PRE,
     ["MEGATRAIN_MALLOC=", "no/libtcmalloc.so", "no such file", "auto, system"], ["{out}/run"]),
    ("pretrain-kernel-backend", PRE + " model.kernel_backend=cuda",
     ["kernel_backend='cuda'", "must be one of auto, torch, triton"], ["{out}/run"]),
    ("pretrain-model-type", PRE + " model.model_type=gpt", ["model.model_type='gpt'", "mega, megalodon"],
     ["{out}/run"]),
    ("pretrain-mega-field-on-megalodon", MLO + " model.ema_projection_size=8",
     ["model.ema_projection_size", "a mega setting", "model.model_type=megalodon"], ["{out}/run"]),
    ("pretrain-megalodon-field-on-mega", PRE + " model.norm_num_groups=4",
     ["model.norm_num_groups", "a megalodon setting", "model.model_type=mega"], ["{out}/run"]),
    ("pretrain-megalodon-groups", MLO + " model.norm_num_groups=5",
     ["norm_num_groups=5", "must divide hidden_size=32"], ["{out}/run"]),
    ("pretrain-megalodon-sp-chunk", "env RANK=0 WORLD_SIZE=2 " + MLO + " parallel.sequence_parallel_size=2 "
     "model.chunk_size=32", ["16", "not a multiple of model.chunk_size=32"], ["{out}/run"]),
    ("pretrain-megalodon-mlm", MLO + " train.objective=mlm", ["train.objective=mlm", "causal"], ["{out}/run"]),
    ("pretrain-missing-shards", PRE + " data.shards={w}/none/index.json", ["data.shards=", "no such file"],
     ["{out}/run"]),
    ("pretrain-vocab-mismatch", PRE + " model.vocab_size=48", ["data.shards=", "vocab_size=48"], ["{out}/run"]),
    ("pretrain-truncated-shard", PRE + " data.shards={w}/truncated/index.json",
     ["shard-000001.tar", "bytes on disk but the manifest records"], ["{out}/run"]),
    ("pretrain-sp3-on-2-ranks", "env RANK=0 WORLD_SIZE=2 " + PRE + " parallel.sequence_parallel_size=3",
     ["parallel.sequence_parallel_size=3", "world size 2"], ["{out}/run"]),
    ("pretrain-eval-no-shards", PRE + " eval.every_steps=2", ["eval.shards", "held-out manifest"], ["{out}/run"]),
    ("pretrain-eval-missing-shards", PRE + " eval.every_steps=2 eval.shards={w}/none/index.json",
     ["eval.shards=", "{w}/none/index.json", "no such file"], ["{out}/run"]),
    ("pretrain-eval-seq-len", PRE + " eval.every_steps=2 eval.shards={w}/shards eval.seq_len=36",
     ["eval.seq_len=36", "chunk_size"], ["{out}/run"]),
    ("pretrain-wandb-mode", PRE + " logging.wandb.project=p logging.wandb.mode=cloud",
     ["logging.wandb.mode='cloud'", "offline, online"], ["{out}/run"]),
    ("pretrain-eval-every-negative", PRE + " eval.every_steps=-1", ["eval.every_steps=-1", ">= 0"], ["{out}/run"]),
    # ---- faults nobody causes (megatrain/train/faults.py): their settings
    ("pretrain-spike-action", PRE + " train.spike.action=ignore", ["train.spike.action='ignore'", "rollback"],
     ["{out}/run"]),
    ("pretrain-spike-recheck-warn", PRE + " train.spike.recheck=true",
     ["train.spike.recheck=True", "action=skip or rollback"], ["{out}/run"]),
    ("pretrain-step-timeout", PRE + " train.step_timeout_s=0", ["train.step_timeout_s=0", "> 0"], ["{out}/run"]),
    ("pretrain-pg-timeout", PRE + " parallel.timeout_s=-5", ["parallel.timeout_s=-5", "> 0"], ["{out}/run"]),
    ("checkpoints-no-run", "{py} {root}/launch/checkpoints.py {w}/none ls", ["RUN {w}/none", "no such folder"], []),
    ("checkpoints-no-command", "{py} {root}/launch/checkpoints.py {w}", ["checkpoints: error:"], []),
    ("pretrain-eval-other-tokenizer", "{py} {pretrain} --config {tiny} data.shards={w}/tokshards run_dir={out}/run "
     "model.vocab_size=300 eval.every_steps=2 eval.shards={w}/otherheld",
     ["eval.shards={w}/otherheld", "tokenizer sha256", "must share one tokenizer"], ["{out}/run"]),
    # ---- mixtures, remote shards, the seq_len schedule (megatrain/data: mixture.py, remote.py; config.data_stages)
    ("pretrain-source-weight-zero", PRE + " data.shards= " + SOURCE.format(name="a", weight="0"),
     ["data.sources[0].weight=0", "must be a number > 0"], ["{out}/run"]),
    ("pretrain-source-weight-lots", PRE + " data.shards= " + SOURCE.format(name="a", weight='"lots"'),
     ["data.sources[0].weight='lots'", "must be a number > 0"], ["{out}/run"]),
    ("pretrain-duplicate-source", PRE + " data.shards= " + SOURCES2.format(a="a", b="a"),
     ["data.sources[1].name='a'", "duplicate source name"], ["{out}/run"]),
    ("pretrain-shards-and-sources", PRE + " " + SOURCE.format(name="a", weight="1"),
     ["data.shards=", "exactly one of them"], ["{out}/run"]),
    ("pretrain-unreachable-url", PRE + " data.shards=http://127.0.0.1:9/corpus/index.json data.retries=1 "
     "data.retry_backoff_s=0.01", ["http://127.0.0.1:9/corpus/index.json", "after 1 retries", "Connect"],
     ["{out}/run"]),
    ("pretrain-url-403", PRE + " data.shards={forbidden}corpus/index.json",
     ["{forbidden}corpus/index.json", "HTTP 403"], ["{out}/run"]),
    ("pretrain-stages-not-increasing", PRE + " data.seq_len_schedule=[[0,32],[4,64],[4,16]]",
     ["data.seq_len_schedule[2]=[4, 16]", "steps must increase"], ["{out}/run"]),
    ("pretrain-stage-first-not-0", PRE + " data.seq_len_schedule=[[2,32]]",
     ["data.seq_len_schedule[0]=[2, 32]", "start at step 0"], ["{out}/run"]),
    ("pretrain-stage-tokens-change", PRE + " data.seq_len_schedule=[[0,32],[4,48]]",
     ["data.seq_len_schedule[1]=[4, 48]", "tokens per step must stay"], ["{out}/run"]),
    ("pretrain-stage-not-whole-chunks", "env RANK=0 WORLD_SIZE=2 " + PRE +
     " parallel.sequence_parallel_size=2 data.seq_len_schedule=[[0,32],[4,8]]",
     ["data.seq_len_schedule[1]=[4, 8]", "chunk"], ["{out}/run"]),
    # ---- launch/slurm/pretrain.sbatch outside Slurm
    ("sbatch-no-config", "bash {sbatch}", ["no CONFIG given", "usage"], []),
    ("sbatch-missing-config", "bash {sbatch} {w}/nowhere.yaml", ["nowhere.yaml", "not found"], []),
    ("sbatch-outside-slurm", "bash {sbatch} {tiny}", ["SLURM_JOB_ID is not set", "sbatch"], []),
]

# ---- launch/export_hf.py, on {w}/export (the `export_world` fixture: a 1-step single-process ZeRO-3 run of the
# tiny config, vocab 64, whose shards name no tokenizer; a partial and a mismatched copy of its checkpoint). The
# success cases (a run folder as CHECKPOINT, ...) are in tests/export/test_export.py.
EXP = "{py} {export} {w}/export/run {out}/hf"
EXPORT_CASES = [
    ("export-missing-checkpoint", "{py} {export} {w}/nowhere {out}/hf", ["nowhere", "no such folder"],
     ["{out}/hf"]),
    ("export-partial-checkpoint", "{py} {export} {w}/export/partial {out}/hf",
     ["partial", "incomplete checkpoint"], ["{out}/hf"]),
    ("export-checkpoint-of-another-config", "{py} {export} {w}/export/other {out}/hf",
     ["CHECKPOINT {w}/export/other:", "config expects"], ["{out}/hf"]),
    ("export-out-not-empty", "{py} {export} {w}/export/run {w}/full", ["full", "not empty", "--overwrite"], []),
    ("export-out-is-file", "{py} {export} {w}/export/run {w}/afile.txt", ["afile.txt", "not a folder"], []),
    ("export-tokenizer-vocab-mismatch", EXP + " --tokenizer {w}/tok", ["{w}/tok", "300 pieces", "vocab_size is 64"],
     ["{out}/hf"]),
    ("export-no-tokenizer-found", EXP, ["no tokenizer found", "--tokenizer DIR", "--no-tokenizer"], ["{out}/hf"]),
    ("export-not-a-tokenizer", EXP + " --tokenizer {w}/fake_tok", ["fake_tok", "not a sentencepiece model"],
     ["{out}/hf"]),
    ("export-bad-dtype", EXP + " --no-tokenizer --dtype fp16", ["--dtype", "'fp16'"], ["{out}/hf"]),
    ("export-hub-offline", "env HF_HUB_OFFLINE=1 " + EXP + " --no-tokenizer --push-to-hub me/x",
     ["--push-to-hub me/x", "offline"], ["{out}/hf"]),
    ("export-megalodon-to-native-mega", "{py} {export} {w}/export/megalodon {out}/hf --no-tokenizer --native",
     ["--native", "transformers has no Megalodon class", "export without --native"], ["{out}/hf"]),
    ("export-hub-no-token",  # online as far as huggingface_hub knows, but no token anywhere
     "env HF_HUB_OFFLINE=0 HF_TOKEN= HF_HOME={out}/hf_home " + EXP + " --no-tokenizer --push-to-hub me/x",
     ["--push-to-hub me/x", "no Hugging Face token"], ["{out}/hf"]),
]

# ---- launch/evaluate.py (SOURCE {w}/export/run: the export_world fixture's run; {w}/shards: the tiny shards)
EVAL = "{py} {evaluate}"
EVALUATE_CASES = [
    ("evaluate-missing-shards", EVAL + " {w}/export/run --shards {w}/none", ["--shards {w}/none", "not found"], []),
    ("evaluate-unknown-source", EVAL + " {w}/text --shards {w}/shards", ["SOURCE", "text", "transformers MEGA"], []),
    ("evaluate-missing-source", EVAL + " {w}/nowhere --shards {w}/shards", ["SOURCE {w}/nowhere", "no such folder"],
     []),
    ("evaluate-length-not-whole-chunks", EVAL + " {w}/export/run --shards {w}/shards --seq-len 36",
     ["--seq-len=36", "multiple of model.chunk_size"], []),
    ("evaluate-length-not-a-number", EVAL + " {w}/export/run --shards {w}/shards --seq-len 4k",
     ["--seq-len '4k'", "integers"], []),
    ("evaluate-sp-not-dividing", EVAL + " {w}/export/run --shards {w}/shards --sp 3", ["--sp 3", "world size 1"], []),
]

# ---- bench/bakeoff.py ({w}/shards has no held-out split)
BAKE = "{py} {bakeoff} --preset cpu-tiny --out {out}/b"
CASES += [
    ("bakeoff-unknown-arch", BAKE + " --data {w}/shards --archs mega,gpt9", ["--archs", "gpt9", "known"], ["{out}/b"]),
    ("bakeoff-no-heldout", BAKE + " --data {w}/shards", ["--data {w}/shards", "heldout/index.json"], ["{out}/b"]),
    ("bakeoff-bad-lrs", BAKE + " --data {w}/shards --lrs fast", ["--lrs 'fast'", "numbers"], ["{out}/b"]),
    ("bakeoff-seq-len-not-chunks", BAKE + " --data {w}/shards --seq-len 100", ["--seq-len 100", "chunk_size 16"],
     ["{out}/b"]),
]

# Under a launcher with 2 ranks every rank hits the error: it must be printed once (rank 0).
LAUNCHER_CASES = [
    ("deepspeed-unknown-key", PRE + " train.lrr=1", ["unknown config key 'train.lrr'"], ["{out}/run"]),
    ("deepspeed-sp3-on-2-ranks", PRE + " parallel.sequence_parallel_size=3",
     ["parallel.sequence_parallel_size=3", "world size 2"], ["{out}/run"]),
]


@pytest.fixture(scope="session")
def world(tmp_path_factory, request):
    """Inputs for every case: text, odd files, a tokenizer, shards, a truncated copy, bad manifests, and a
    loopback HTTP server that answers 403 to everything ({forbidden})."""
    w = tmp_path_factory.mktemp("bad_input")
    stack = contextlib.ExitStack()
    request.addfinalizer(stack.close)
    url, faults = stack.enter_context(http_server(str(w)))
    faults.add("corpus/index.json", *["403"] * 1000)
    FORBIDDEN.append(url)
    (w / "text").mkdir()
    rng = __import__("random").Random(0)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]
    for i in range(4):
        (w / "text" / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(3000)) + "\n12345 !?\n")
    (w / "empty.txt").write_text("")
    (w / "corrupt.txt.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip" * 10)
    (w / "bad.jsonl").write_text("{not json\n")
    (w / "other.jsonl").write_text('{"body": "x"}\n')
    (w / "afile.txt").write_text("a file, not a folder\n")
    (w / "full").mkdir()
    (w / "full" / "keep.txt").write_text("user data\n")
    faults.add("forbidden.jsonl", *["403"] * 1000)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["a document"]}), w / "nocol.parquet")
    (w / "corrupt.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"not a zstd frame" * 10)
    (w / "fake_tok").mkdir()
    (w / "fake_tok" / "tokenizer.model").write_bytes(b"not a model")
    p = subprocess.run([sys.executable, os.path.join(TOOLS, "train_tokenizer.py"), "--input", str(w / "text"),
                        "--vocab-size", "300", "--out", str(w / "tok")], capture_output=True, text=True,
                       env=pretrain_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    write_shards(str(w / "shards"))  # the tiny training shards (vocab 64): not built with w/tok
    shutil.copytree(w / "shards", w / "truncated")
    shard = w / "truncated" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-700])
    (w / "notjson").mkdir()
    (w / "notjson" / "index.json").write_text("{")
    # shards built with w/tok, and a held-out manifest claiming another tokenizer (eval.shards mismatch)
    p = subprocess.run([sys.executable, os.path.join(TOOLS, "build_shards.py"), "--input", str(w / "text"),
                        "--tokenizer", str(w / "tok"), "--out", str(w / "tokshards"), "--workers", "1"],
                       capture_output=True, text=True, env=pretrain_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    shutil.copytree(w / "tokshards", w / "otherheld")
    # task 0 of 2 of an array build (one unit per file): the merge finds unit 1's part missing
    p = subprocess.run([sys.executable, os.path.join(TOOLS, "build_shards.py"), "--input", str(w / "text"),
                        "--tokenizer", str(w / "tok"), "--out", str(w / "halfbuilt"), "--workers", "1",
                        "--unit-size", "1", "--num-tasks", "2", "--task-index", "0"],
                       capture_output=True, text=True, env=pretrain_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    man = (w / "otherheld" / "index.json").read_text()
    sha = __import__("json").loads(man)["tokenizer_sha256"]
    (w / "otherheld" / "index.json").write_text(man.replace(sha, "0" * 64))
    (w / "wrongformat").mkdir()
    (w / "wrongformat" / "index.json").write_text('{"format": "something-else"}')
    return w


@pytest.fixture(scope="session")
def export_world(world):
    """{w}/export: run/ (1 step, single process, ZeRO-3, a checkpoint), partial/ (its tag folder without the ZeRO
    optimizer states), other/ (its tag folder with a config.yaml of another hidden_size) and megalodon/ (a 1-step
    run of configs/megalodon_tiny.yaml). ~15 s."""
    e = world / "export"
    p = subprocess.run([sys.executable, PRETRAIN, "--config", TINY, f"data.shards={world}/shards/index.json",
                        f"run_dir={e}/run", "train.max_steps=1", "train.warmup_steps=0", "checkpoint.every_steps=1",
                        "parallel.zero_stage=3", "logging.tensorboard=false"], cwd=ROOT, env=pretrain_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    tag = e / "run" / "checkpoints" / (e / "run" / "checkpoints" / "latest").read_text().strip()
    shutil.copytree(tag, e / "partial")
    for f in (e / "partial").glob("*optim_states.pt"):
        f.unlink()
    shutil.copytree(tag, e / "other")
    cfg = (e / "other" / "config.yaml").read_text()
    assert "hidden_size: 32" in cfg
    (e / "other" / "config.yaml").write_text(cfg.replace("hidden_size: 32", "hidden_size: 48"))
    p = subprocess.run([sys.executable, PRETRAIN, "--config", os.path.join(ROOT, "configs", "megalodon_tiny.yaml"),
                        f"data.shards={world}/shards/index.json", f"run_dir={e}/megalodon", "train.max_steps=1",
                        "train.warmup_steps=0", "checkpoint.every_steps=1", "logging.tensorboard=false"], cwd=ROOT,
                       env=pretrain_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return e


def _run(case, world, tmp_path, prefix=()):
    name, template, expect, absent = case
    fill = dict(py=sys.executable, tools=TOOLS, pretrain=PRETRAIN, sbatch=SBATCH, tiny=TINY, megalodon=MEGALODON_TINY,
                w=world, out=tmp_path, root=ROOT, export=EXPORT, evaluate=EVALUATE, bakeoff=BAKEOFF,
                forbidden=FORBIDDEN[-1])
    cmd = list(prefix) + [part.format(**fill) for part in template.split()]
    env = pretrain_env()
    for k in [k for k in env if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")]:
        del env[k]
    snapshot = sorted(os.listdir(world / "full"))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, f"{name}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, f"{name}:\n{p.stderr[-3000:]}"
    lines = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert lines, f"{name}: no error line\n{p.stderr[-2000:]}"
    for s in expect:
        assert s.format(**fill) in lines[-1], f"{name}: {s!r} not in {lines[-1]!r}"
    for path in absent:
        assert not os.path.exists(path.format(**fill)), f"{name}: {path} was written"
    assert sorted(os.listdir(world / "full")) == snapshot, f"{name}: a non-empty output folder was touched"
    leftovers = [n for d in (tmp_path, world) for n in os.listdir(d) if ".tmp-" in n]
    assert not leftovers, f"{name}: temporary output left behind: {leftovers}"
    return p, lines


ALL = CASES + EXPORT_CASES + EVALUATE_CASES


@pytest.mark.parametrize("case", ALL, ids=[c[0] for c in ALL])
def test_bad_input_is_one_line_exit_2(case, world, tmp_path, request):
    if case[0].startswith(("export-", "evaluate-")):
        request.getfixturevalue("export_world")  # a checkpoint: made only when an export case runs
    p, lines = _run(case, world, tmp_path)
    assert len(lines) == 1, f"{case[0]}: {len(lines)} error lines:\n{p.stderr[-3000:]}"
    if "sp3" in case[0]:
        assert not any(s in lines[0] for s in NOT_SP), lines[0]
    if case[0] == "export-checkpoint-of-another-config":
        assert lines[0].count("export/other") == 1, lines[0]  # the folder is named once


def test_table_is_big_enough():
    assert len(CASES) + len(LAUNCHER_CASES) >= 35


@pytest.mark.slow
@pytest.mark.parametrize("case", LAUNCHER_CASES, ids=[c[0] for c in LAUNCHER_CASES])
def test_bad_input_printed_once_under_deepspeed(case, world, tmp_path):
    from megatrain.parallel.env import find_launcher
    launcher = find_launcher("deepspeed")
    assert launcher, "the deepspeed launcher is a dev dependency"
    template = case[1].replace("{py} ", "", 1)  # the launcher starts the interpreter
    p, lines = _run((case[0], template, case[2], case[3]), world, tmp_path,
                    prefix=[launcher, "--num_gpus", "2", "--master_port", str(free_port())])
    mine = [ln for ln in lines if "pretrain: error:" in ln]
    assert len(mine) == 1, f"{case[0]}: printed {len(mine)} times:\n{p.stderr[-3000:]}"
    if "sp3" in case[0]:
        assert not any(s in mine[0] for s in NOT_SP), mine[0]
