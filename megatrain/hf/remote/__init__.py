"""transformers wrappers around megatrain's own model, shipped as remote code with every export.

configuration_mega.py (a PretrainedConfig for MegaConfig's fields) and modeling_mega.py (PreTrainedModel classes
for the seven transformers MEGA classes) are ordinary megatrain modules: megatrain/hf/remote_code.py copies
them, with the megatrain modules they import, into an export folder as flat files with relative imports.
Tests: PYTHONPATH=. python -m pytest -q tests/hf/test_remote_code.py
"""
