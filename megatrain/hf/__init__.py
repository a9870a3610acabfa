"""The transformers format of MEGA models; depends only on megatrain.model and megatrain.ops.

    from megatrain.hf import load_hf, save_hf
    model = load_hf("hf_dir")           # any transformers-4.57 MEGA folder or a megatrain export; eval mode
    save_hf(model, "out_dir")           # AutoModelForCausalLM / AutoModelForMaskedLM ... load it natively
Tests: PYTHONPATH=. python -m pytest -q tests/hf

format.py       the one megatrain <-> transformers key map (both directions), config.json, load_hf / save_hf
init_from.py    a run's model.init_from: check_init_from (config validation) and init_from_hf (the trainer)
remote_code.py  megatrain's model code shipped with an export: the explicit list of shipped modules, flattened
remote/         the transformers classes (PretrainedConfig, PreTrainedModel) around megatrain's model
A training checkpoint -> HF folder is megatrain.export (above megatrain.train).
"""
from megatrain.hf.format import load_hf, save_hf

__all__ = ["load_hf", "save_hf"]
