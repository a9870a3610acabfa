"""Checkpoint conversion. `megatrain.convert.hf`: load_hf / save_hf for transformers MEGA folders."""
