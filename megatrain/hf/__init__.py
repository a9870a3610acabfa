"""The transformers format of megatrain's model families (MEGA, Megalodon); depends only on megatrain.model and
megatrain.ops.

    from megatrain.hf import load_hf, save_hf
    model = load_hf("hf_dir")           # a transformers-4.57 MEGA folder or a megatrain export (MEGA, Megalodon)
    save_hf(model, "out_dir")           # MEGA: AutoModelForCausalLM / AutoModelForMaskedLM ... load it natively
Tests: PYTHONPATH=. python -m pytest -q tests/hf

keymap.py       the one megatrain <-> transformers key map (a table per family)
mega.py         MEGA's side of the format (tasks, config.json <-> MegaConfig); megalodon.py: Megalodon's
format.py       load_hf / save_hf for a folder of any family
init_from.py    a run's model.init_from: check_init_from (config validation) and init_from_hf (the trainer)
remote_code.py  megatrain's model code shipped with an export: each family's explicit list of shipped modules
remote/         the transformers classes (PretrainedConfig, PreTrainedModel) around megatrain's models:
                wrapper.py (what every family shares), configuration_/modeling_mega.py, ..._megalodon.py
A training checkpoint -> HF folder is megatrain.export (above megatrain.train).
"""
__all__ = ["load_hf", "save_hf"]


def __getattr__(name):
    # lazy: the remote code an export ships imports this package's family modules alone (not format.py, which
    # loads every family)
    if name in __all__:
        from megatrain.hf import format
        return getattr(format, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
