"""The model card (README.md) of an export: what was trained, how to load it, what works where.

    from megatrain.export.card import model_card
    text = model_card(run_config, tag_dir, run_dir, task="causal", why_not_native=None, dtype="fp32")
Tests: PYTHONPATH=. python -m pytest -q tests/export/test_export.py
"""
from __future__ import annotations

import os
from typing import Optional

from megatrain.hf.format import REMOTE_ONLY_MODEL_TYPE


def model_card(cfg, tag_dir: str, run_dir: str, task: str, why_not_native: Optional[str], dtype: str) -> str:
    """The README.md of an export of checkpoint `tag_dir` (its run folder `run_dir`, "" if unknown)."""
    import yaml
    metrics = os.path.join(run_dir, "metrics.jsonl") if run_dir else ""
    last = {}
    if metrics and os.path.exists(metrics):
        from megatrain.train.metrics import read_metrics
        recs = read_metrics(metrics)
        last = recs[-1] if recs else {}
    auto = "AutoModelForCausalLM" if task == "causal" else "AutoModelForMaskedLM"
    native = ("transformers 4.57.x also loads it natively (without `trust_remote_code`), with the same logits; "
              "its native MEGA has no `generate()` and needs lengths that are a multiple of chunk_size."
              if not why_not_native else
              f"**Not loadable natively**: {why_not_native}, so this folder has model_type "
              f"`{REMOTE_ONLY_MODEL_TYPE}` and needs `trust_remote_code=True` everywhere.")
    model_yaml = yaml.safe_dump({k: v for k, v in cfg.model.to_dict().items()}, sort_keys=True)
    return f"""---
library_name: transformers
tags: [mega, megatrain, long-context]
---
# MEGA ({task} LM) trained with megatrain

Moving Average Equipped Gated Attention (Ma et al., arXiv 2209.10655), pretrained with
[megatrain](https://github.com/) and exported from `{os.path.basename(tag_dir)}`.

| | |
|---|---|
| objective | {cfg.train.objective} |
| data | `{cfg.data.shards}` (windows of {cfg.data.seq_len} tokens) |
| steps | {last.get('step', 'unknown')} |
| tokens | {last.get('tokens', 'unknown')} |
| final loss | {last.get('loss', 'unknown')} |
| weights | {dtype} |

## Load

transformers 4.x and 5.x (MEGA was removed from transformers in 5.0; this folder ships megatrain's own model code):

```python
from transformers import AutoTokenizer, {auto}
tok = AutoTokenizer.from_pretrained("PATH_OR_REPO", trust_remote_code=True)  # 5.x reads config.json too
model = {auto}.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
{"ids = model.generate(tok('Hello', return_tensors='pt').input_ids, max_new_tokens=20)" if task == "causal" else
 "logits = model(**tok('Hello <mask>', return_tensors='pt')).logits"}
```
Fine-tune with `AutoModelForSequenceClassification`, `AutoModelForTokenClassification`,
`AutoModelForQuestionAnswering` or `AutoModelForMultipleChoice` (also `trust_remote_code=True`).
Any input length works; generation carries the EMA state and the current chunk's keys/values.

{native}

## What works where

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

PEFT LoRA: the linear layers are `mega_layer.v_proj`, `mega_layer.mx_proj`, `mega_layer.h_proj`,
`nffn.fc1`, `nffn.fc2` in every layer and the LM's `dense`:
```python
from peft import LoraConfig, get_peft_model
model = get_peft_model(model, LoraConfig(r=8, target_modules=["v_proj", "mx_proj", "h_proj", "fc1", "fc2"]))
# or target_modules="all-linear"; after training: model.merge_and_unload().save_pretrained("merged")
```

## Config

```yaml
{model_yaml}```
"""
