"""A training checkpoint -> a Hugging Face folder (+ verify, model card, Hub). Above megatrain.train.

    from megatrain.export import export, ExportError
    info = export("runs/x", "hf_out", do_verify=True)      # CLI: python launch/export_hf.py runs/x hf_out --verify
    from megatrain.export.load import load_model
    model, cfg = load_model("runs/x/checkpoints")          # a checkpoint as a plain model (no engine)
Tests: PYTHONPATH=. python -m pytest -q tests/export

folder.py (the export: inputs checked, written through a temporary folder, the Hub), load.py (checkpoint ->
model), card.py (README.md), verify.py (--verify). The transformers format itself: megatrain.hf.
"""
from megatrain.export.folder import ExportCheckFailed, ExportError, export

__all__ = ["export", "ExportError", "ExportCheckFailed"]
