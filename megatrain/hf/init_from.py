"""Start a run from a transformers MEGA folder (config `model.init_from`): the check and the weight load.

    from megatrain.hf.init_from import check_init_from, init_from_hf
    check_init_from("hf_dir", run_config.model)     # megatrain/config.py, while validating (reads config.json only)
    init_from_hf(model, "hf_dir")                    # megatrain/train/trainer.py, into the freshly built model
Tests: PYTHONPATH=. python -m pytest -q tests/export/test_export.py -k init_from   (a real run)
"""
from __future__ import annotations

from megatrain.hf.format import _read_state_dict, _task_of, load_checked, read_hf_config, task_of_config
from megatrain.hf.mega import hf_to_megatrain_state_dict
from megatrain.model.mega.config import MegaConfig


# the fields a weight folder must agree on with a run to continue its pretraining (model.init_from)
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "ema_projection_size", "bidirectional",
    "shared_representation_size", "use_chunking", "chunk_size", "truncation", "normalize_before_mega",
    "normalization_type", "norm_affine", "activation", "attention_activation", "use_normalized_ffn",
    "nffn_hidden_size", "normalize_before_ffn", "max_positions", "add_token_type_embeddings", "type_vocab_size",
    "relative_positional_bias", "add_lm_hidden_dense_layer", "is_decoder", "tie_word_embeddings", "hf_rmsnorm_noop")


def check_init_from(path: str, run_model: MegaConfig, key: str = "model.init_from") -> tuple[MegaConfig, dict]:
    """The folder's (MegaConfig, config.json dict) if it can start a run with model config `run_model`, else one
    ValueError naming `key`, the field and both values."""
    try:
        theirs, d = read_hf_config(path)
    except ValueError as e:
        raise ValueError(f"{key}={path}: {e}") from None
    if theirs.model_type != run_model.model_type:
        raise ValueError(f"{key}={path}: a {theirs.model_type} folder (config.json model_type "
                         f"{d.get('model_type')!r}) cannot start a run of model.model_type={run_model.model_type}")
    for name in ARCHITECTURE_FIELDS:
        a, b = getattr(theirs, name), getattr(run_model, name)
        if a != b:
            raise ValueError(f"{key}={path}: its config.json has {name}={a!r} but the run has model.{name}={b!r}; "
                             "the run's model section must match the folder")
    return theirs, d


def init_from_hf(model, path: str) -> None:
    """Load a transformers MEGA folder's weights (native 4.57 or megatrain's export, any head: the backbone and,
    for a language model of the same kind, its head) into a freshly built run model, after check_init_from."""
    _, d = check_init_from(path, model.config)
    task = _task_of(model)
    src_task = task_of_config(d)
    sd = hf_to_megatrain_state_dict(_read_state_dict(path), src_task)
    if src_task != task:  # another head (a fine-tuned one, a bare MegaModel): the backbone, and the run's own head
        own = model.state_dict()
        sd = {k: v for k, v in sd.items() if k.startswith("mega.")}
        sd.update({k: v for k, v in own.items() if not k.startswith("mega.")})
    load_checked(model, sd, f"model.init_from={path}")
