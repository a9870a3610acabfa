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

## Config

```yaml
{model_yaml}```
"""
