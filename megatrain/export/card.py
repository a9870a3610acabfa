"""The model card (README.md) of an export: what was trained, how to load it, what works where (MEGA, Megalodon).

    from megatrain.export.card import model_card, CLIENTS
    text = model_card(run_config, tag_dir, run_dir, task="causal", why_not_native=None, dtype="fp32")
    text = model_card(..., native=True)      # a --native folder (transformers 4.57's own MEGA, no remote code)
Tests: PYTHONPATH=. python -m pytest -q tests/export/test_export.py tests/hf/test_hf_clients.py

CLIENTS is the one list of the downstream clients an export works with (Trainer, PEFT LoRA, pipelines,
lm-evaluation-harness): the card's "Works with" section is written from it, and tests/hf/clients_check.py runs each
client's command *as the card prints it* (Client.command_for: PATH_OR_REPO replaced by a real export, the family's
LoRA target modules filled in) in every transformers version and for every family the entry names;
tests/hf/test_hf_clients.py compares the outcome with megatrain's own numbers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from megatrain.hf.mega import REMOTE_ONLY_MODEL_TYPE

# PEFT LoRA's target_modules, per family: the linear layers of every layer (MEGA: and the LM's hidden dense;
# Megalodon: fc3 is SwiGLU's gate, where the config has it)
LORA_TARGETS = {"mega": ("v_proj", "mx_proj", "h_proj", "fc1", "fc2", "dense"),
                "megalodon": ("wv", "wz", "wr", "wh1", "wh2", "fc1", "fc2", "fc3")}
FAMILIES = tuple(LORA_TARGETS)


@dataclass(frozen=True)
class Client:
    name: str                 # the check in tests/hf/clients_check.py
    title: str
    tasks: tuple              # exports it applies to: "causal", "masked"
    versions: tuple           # transformers versions it is tested in (a card claim: each one is a test)
    lang: str                 # "python" (run as is) or "bash" (one command line)
    command: str              # PATH_OR_REPO: the export; LORA_TARGETS: the family's; other inputs: its comments
    files: tuple = ()         # (file name, text) the command reads, written next to it
    families: tuple = FAMILIES  # model families it applies to

    def versions_text(self) -> str:
        return ", ".join(VERSIONS[v] for v in self.versions)

    def applies(self, family: str, task: str) -> bool:
        return family in self.families and task in self.tasks

    def command_for(self, family: str, path: str = "PATH_OR_REPO") -> str:
        """The command as the card of a `family` export prints it (path: the export, where it is run)."""
        return self.command.replace("LORA_TARGETS", repr(list(LORA_TARGETS[family]))).replace("PATH_OR_REPO", path)


VERSIONS = {"4.57": "transformers 4.57", "5.x": "transformers 5.x"}
PPL_TASK = "megatrain_ppl"
FILL_MASK_TEXT = "The quick brown <mask> jumps over the lazy dog."
CLIENTS = (
    Client("trainer", "`Trainer` fine-tunes `AutoModelForSequenceClassification` with gradient checkpointing",
           ("causal", "masked"), ("4.57", "5.x"), "python", """\
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments
tok = AutoTokenizer.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
model = AutoModelForSequenceClassification.from_pretrained("PATH_OR_REPO", num_labels=2, trust_remote_code=True)
data = Dataset.from_dict({"text": texts, "label": labels}).map(lambda b: tok(b["text"]), batched=True)  # your data
args = TrainingArguments("finetuned", max_steps=20, per_device_train_batch_size=4, learning_rate=3e-3,
                         gradient_checkpointing=True, logging_steps=1, save_strategy="no", report_to="none")
trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tok)
trainer.train()
""", families=("mega",)),
    Client("trainer-lm", "`Trainer` continues training `AutoModelForCausalLM` with gradient checkpointing",
           ("causal",), ("4.57", "5.x"), "python", """\
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                          TrainingArguments)
tok = AutoTokenizer.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
data = Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
args = TrainingArguments("finetuned", max_steps=20, per_device_train_batch_size=4, learning_rate=3e-3,
                         gradient_checkpointing=True, logging_steps=1, save_strategy="no", report_to="none")
trainer = Trainer(model=model, args=args, train_dataset=data,
                  data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
trainer.train()
"""),
    Client("peft-lora", "PEFT LoRA trains, merges back and saves a checkpoint megatrain reads", ("causal",),
           ("4.57", "5.x"), "python", """\
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=3e-3)
for input_ids in batches:  # your data: LongTensors [batch, length]
    lora(input_ids=input_ids, labels=input_ids).loss.backward()
    opt.step()
    opt.zero_grad()
lora.merge_and_unload().save_pretrained("merged")  # a plain checkpoint: megatrain.hf.load_hf("merged") reads it
"""),
    Client("text-generation", '`pipeline("text-generation")` (greedy: megatrain.generate\'s tokens)', ("causal",),
           ("4.57", "5.x"), "python", """\
from transformers import pipeline
generate = pipeline("text-generation", model="PATH_OR_REPO", trust_remote_code=True)
out = generate(prompt, max_new_tokens=12, do_sample=False)  # prompt: your text
print(out[0]["generated_text"])
"""),
    Client("fill-mask", '`pipeline("fill-mask")` (the tokenizer maps `<mask>` in text to the mask id)', ("masked",),
           ("4.57", "5.x"), "python", f"""\
from transformers import pipeline
fill = pipeline("fill-mask", model="PATH_OR_REPO", trust_remote_code=True)
out = fill({FILL_MASK_TEXT!r}, top_k=5)
print([(o["token_str"], round(o["score"], 4)) for o in out])
"""),
    Client("lm-eval", "lm-evaluation-harness: rolling loglikelihood / perplexity of a local text file "
           "(equal to megatrain's own evaluation)", ("causal",), ("4.57", "5.x"), "bash",
           f"lm_eval --model hf --model_args pretrained=PATH_OR_REPO,trust_remote_code=True,dtype=float32 "
           f"--tasks {PPL_TASK} --include_path tasks --batch_size 1 --output_path results",
           ((f"tasks/{PPL_TASK}.yaml", f"""\
# docs.jsonl: one {{"text": ...}} per line
task: {PPL_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: docs.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""),)),
)


def works_with(task: str, family: str = "mega") -> str:
    """The card's "Works with" section for a `family` export of `task`: CLIENTS that apply, with their commands."""
    rows, blocks = [], []
    for c in (c for c in CLIENTS if c.applies(family, task)):
        rows.append(f"| {c.title} | {c.versions_text()} |")
        files = "".join(f"`{name}`:\n```yaml\n{text}```\n" for name, text in c.files)
        blocks.append(f"### {c.name}\n\n{files}```{c.lang}\n{c.command_for(family).rstrip()}\n```\n")
    lora = ("\nPEFT LoRA target modules: " + ", ".join(f"`{t}`" for t in LORA_TARGETS[family]) +
            ' (or `target_modules="all-linear"`).\n' if task == "causal" else "")
    return ("## Works with\n\nEach command below runs in megatrain's CI on a real export "
            "(`tests/hf/test_hf_clients.py`), in the transformers versions named:\n\n"
            "| client | tested in |\n|---|---|\n" + "\n".join(rows) + "\n" + lora + "\n" + "\n".join(blocks))


# what each family's card says: the title and paper, the classes a user loads, what generation carries, the table
_ABOUT = {
    "mega": ("MEGA", "Moving Average Equipped Gated Attention (Ma et al., arXiv 2209.10655)", "the EMA state"),
    "megalodon": ("Megalodon", "Megalodon: efficient LLM pretraining and inference with unlimited context length "
                  "(Ma et al., arXiv 2404.08801): complex EMA, timestep normalization, normalized attention in "
                  "chunks", "the complex EMA state, the timestep-norm statistics"),
}
_MEGA_TABLE = """\
With `trust_remote_code=True` the classes are megatrain's model under transformers' MEGA names (state-dict keys
are transformers'); the same code runs in transformers 4.57 and 5.x. Tested in megatrain's CI
(`tests/hf/test_hf_citizen.py`, `tests/hf/test_remote_code.py`, `tests/export/test_export.py`):

| | 4.57 remote code | 5.x remote code | 4.57 native (no trust_remote_code) |
|---|---|---|---|
| logits equal megatrain's (≤ 1e-5), any length | yes | yes | yes, lengths a multiple of chunk_size |
| `generate`: greedy, sampling, `num_beams` | yes | yes | no (transformers' MEGA lost `generate`) |
| `output_hidden_states`, `output_attentions`, `return_dict=False`, `inputs_embeds` | yes | yes | yes |
| `AutoModel` (`pooler_output`), the four fine-tuning heads | yes | yes | yes |
| `gradient_checkpointing_enable()` / `Trainer(gradient_checkpointing=True)` | yes | yes | no |
| `resize_token_embeddings`, PEFT LoRA, `model.mega.save_pretrained` | yes | yes | — |
| cross-attention (`add_cross_attention`) | no (refused) | no | — |
"""
_MEGALODON_TABLE = """\
transformers has no Megalodon of its own: the classes in this folder (remote code) are megatrain's model, the
state-dict keys megatrain's names; the same code runs in transformers 4.57 and 5.x. Tested in megatrain's CI
(`tests/hf/test_megalodon_export.py`, `tests/hf/test_hf_mixin.py`, `tests/export/test_export.py`):

| | 4.57 remote code | 5.x remote code |
|---|---|---|
| logits equal megatrain's (≤ 1e-5), any length | yes | yes |
| `generate` with the cache: greedy, sampling, `num_beams`, left padding | yes | yes |
| `output_hidden_states`, `output_attentions`, `return_dict=False`, `inputs_embeds` | yes | yes |
| `AutoModel` (`last_hidden_state` after the final timestep norm) | yes | yes |
| `gradient_checkpointing_enable()` / `Trainer(gradient_checkpointing=True)` | yes | yes |
| `resize_token_embeddings`, PEFT LoRA, `model.megalodon.save_pretrained` | yes | yes |
| masked LM, fine-tuning heads, cross-attention | no (Megalodon is causal) | no |
"""


def model_card(cfg, tag_dir: str, run_dir: str, task: str, why_not_native: Optional[str], dtype: str,
               native: bool = False) -> str:
    """The README.md of an export of checkpoint `tag_dir` (its run folder `run_dir`, "" if unknown); `native`: a
    folder for transformers 4.57's own MEGA classes (launch/export_hf.py --native: no remote code)."""
    import yaml
    family = cfg.model.model_type
    name, paper, carried = _ABOUT[family]
    metrics = os.path.join(run_dir, "metrics.jsonl") if run_dir else ""
    last = {}
    if metrics and os.path.exists(metrics):
        from megatrain.train.metrics import read_metrics
        recs = read_metrics(metrics)
        last = recs[-1] if recs else {}
    auto = "AutoModelForCausalLM" if task == "causal" else "AutoModelForMaskedLM"
    remote = "" if native else ", trust_remote_code=True"
    if native:
        where = ("transformers 4.57.x (its own MEGA classes; MEGA was removed from transformers in 5.0, and this "
                 "folder ships no model code: export without `--native` for 5.x and `generate`)")
    elif family == "mega":
        where = ("transformers 4.x and 5.x (MEGA was removed from transformers in 5.0; this folder ships megatrain's "
                 "own model code)")
    else:
        where = ("transformers 4.57 and 5.x (this folder ships megatrain's own model code: transformers has no "
                 "Megalodon)")
    if family == "megalodon":
        heads = "Fine-tune the causal LM itself (Megalodon is causal: no masked LM and no sequence-level heads).\n"
    else:
        heads = ("Fine-tune with `AutoModelForSequenceClassification`, `AutoModelForTokenClassification`,\n"
                 "`AutoModelForQuestionAnswering` or `AutoModelForMultipleChoice`"
                 + (" (also `trust_remote_code=True`).\n" if remote else ".\n"))
    if native:
        note = "Loaded by transformers' own MEGA: logits equal megatrain's for lengths a multiple of chunk_size."
    elif family == "megalodon":
        note = ""
    elif not why_not_native:
        note = ("transformers 4.57.x also loads it natively (without `trust_remote_code`), with the same logits; "
                "its native MEGA has no `generate()` and needs lengths that are a multiple of chunk_size.")
    else:
        note = (f"**Not loadable natively**: {why_not_native}, so this folder has model_type "
                f"`{REMOTE_ONLY_MODEL_TYPE}` and needs `trust_remote_code=True` everywhere.")
    if native:
        table, clients = "", ""
    else:
        table = "## What works where\n\n" + (_MEGA_TABLE if family == "mega" else _MEGALODON_TABLE)
        table += "\nCommands for each client (PEFT LoRA's target modules included): **Works with** below.\n\n"
        clients = works_with(task, family)
    example = ("ids = model.generate(tok('Hello', return_tensors='pt').input_ids, max_new_tokens=20)" if task == "causal"
               else "logits = model(**tok('Hello <mask>', return_tensors='pt')).logits")
    model_yaml = yaml.safe_dump({k: v for k, v in cfg.model.to_dict().items()}, sort_keys=True)
    return f"""---
library_name: transformers
tags: [{family}, megatrain, long-context]
---
# {name} ({task} LM) trained with megatrain

{paper}, pretrained with [megatrain](https://github.com/) and exported from `{os.path.basename(tag_dir)}`.

| | |
|---|---|
| objective | {cfg.train.objective} |
| data | `{cfg.data.shards}` (windows of {cfg.data.seq_len} tokens) |
| steps | {last.get('step', 'unknown')} |
| tokens | {last.get('tokens', 'unknown')} |
| final loss | {last.get('loss', 'unknown')} |
| weights | {dtype} |

## Load

{where}:

```python
from transformers import AutoTokenizer, {auto}
tok = AutoTokenizer.from_pretrained("PATH_OR_REPO"{remote}){"  # 5.x reads config.json too" if remote else ""}
model = {auto}.from_pretrained("PATH_OR_REPO"{remote})
{example}
```
{heads}{"" if native else f"Any input length works; generation carries {carried} and the current chunk's keys/values."}

{note}

{table}{clients}
## Config

```yaml
{model_yaml}```
"""
