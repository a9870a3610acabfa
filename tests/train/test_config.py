"""Config tree: YAML + dotted overrides, typed fields, named errors, validation, the generated DeepSpeed JSON.

Run: PYTHONPATH=. python -m pytest -q tests/train/test_config.py
"""
import glob
import os

import pytest
import yaml

from megatrain.config import Config, ConfigError, load_config
from megatrain.parallel.zero import deepspeed_config
from tests.tiny_data import MEGALODON_TINY, ROOT, TINY

OK = ["data.shards=x/index.json"]


def test_overrides_are_typed():
    cfg = load_config(TINY, OK + ["train.lr=1e-4", "train.max_steps=3", "model.truncation=null",
                                  "data.shards=[a.tar, b.tar]", "deepspeed.zero_optimization.offload_optimizer"
                                  ".device=cpu", "train.grad_clip=2"])
    assert cfg.train.lr == 1e-4 and cfg.train.max_steps == 3 and cfg.train.grad_clip == 2.0
    assert isinstance(cfg.train.grad_clip, float)
    assert cfg.data.shards == ["a.tar", "b.tar"]
    assert cfg.model.hidden_size == 32 and cfg.model.is_decoder is True  # from the YAML's objective
    assert cfg.deepspeed == {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}


@pytest.mark.parametrize("override, match", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("model.hiden_size=3", "unknown config key 'model.hiden_size'"),
    ("bogus=1", "unknown config key 'bogus'"),
    ("train.max_steps=abc", "train.max_steps='abc': expected int"),
    ("train.max_steps=1.5", "train.max_steps=1.5: expected int"),
    ("model.bidirectional=3", "model.bidirectional=3: expected bool"),
    ("model.hidden_size=0", "MegaConfig.hidden_size=0"),
    ("train", "expected key=value"),
    ("train.lr=[1", "cannot parse value"),
    ("model.segment_size=12", "model: MegaConfig.segment_size=12: must be a multiple of chunk_size=8"),
    ("model.segment_size=-8", "model: MegaConfig.segment_size=-8: must be >= 0"),
])
def test_bad_override_names_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, OK + [override])


@pytest.mark.parametrize("overrides, world, match", [
    (["data.seq_len=36"], None, "data.seq_len=36: must be a multiple of model.chunk_size=8"),
    (["parallel.sequence_parallel_size=2", "data.seq_len=40"], None, "= 20 is not a multiple of model.chunk_size=8"),
    (["parallel.sequence_parallel_size=2"], 3, "parallel.sequence_parallel_size=2: must divide the world size 3"),
    (["parallel.sequence_parallel_size=2", "model.use_chunking=false"], None, "needs model.use_chunking"),
    (["parallel.sequence_parallel_size=2", "model.normalization_type=batchnorm"], None,
     "model.normalization_type='batchnorm' is not supported with sequence"),
    (["train.precision=fp16"], None, "train.precision='fp16'"),
    (["parallel.zero_stage=4"], None, "parallel.zero_stage=4"),
    (["train.warmup_steps=100"], None, "train.warmup_steps=100"),
    (["checkpoint.resume=/no/such/ckpt"], None, "checkpoint.resume='/no/such/ckpt'"),
    (["data.shards="], None, "data.shards=''"),
    (["train.offload_activations=true", "model.gradient_checkpointing=false"], None,
     "train.offload_activations=True: needs model.gradient_checkpointing=true"),
])
def test_validation_names_the_key(overrides, world, match):
    cfg = load_config(TINY, OK + overrides)
    with pytest.raises(ConfigError, match=match):
        cfg.validate(world_size=world)


def test_offload_activations_needs_an_accelerator():
    cfg = load_config(TINY, OK + ["train.offload_activations=true", "model.gradient_checkpointing=true"])
    cfg.validate(accelerator=True)
    cfg.validate()      # unknown device: the cross-field checks only
    with pytest.raises(ConfigError, match="train.offload_activations=True: needs a GPU"):
        cfg.validate(accelerator=False)


@pytest.mark.parametrize("overrides, match", [
    (["model.bidirectional=true"], "model.bidirectional=True contradicts train.objective=clm"),
    (["model.is_decoder=false"], "model.is_decoder=False contradicts train.objective=clm"),
    (["train.objective=mlm", "model.is_decoder=true"], "model.is_decoder=True contradicts train.objective=mlm"),
    (["train.objective=xlm"], "train.objective='xlm': must be one of clm, mlm"),
])
def test_objective_contradictions_name_both_keys(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, OK + overrides)


def test_objective_alone_decides_causal_or_masked():
    clm = load_config(TINY, OK).validate()
    assert (clm.model.is_decoder, clm.model.bidirectional) == (True, False)
    mlm = load_config(TINY, OK + ["train.objective=mlm"]).validate()   # nothing else to change
    assert (mlm.model.is_decoder, mlm.model.bidirectional) == (False, True)
    # a compatible explicit value is kept: a masked LM over a left-to-right EMA
    uni = load_config(TINY, OK + ["train.objective=mlm", "model.bidirectional=false"]).validate()
    assert (uni.model.is_decoder, uni.model.bidirectional) == (False, False)
    # a resolved config (what a run saves) loads back unchanged
    assert load_config(None, ["train.objective=mlm"]).model.is_decoder is False


def test_every_config_file_loads_and_validates():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert len(files) >= 4, files
    for f in files:
        with open(f) as fh:
            world = (yaml.safe_load(fh).get("parallel") or {}).get("sequence_parallel_size", 1)
        cfg = load_config(f, OK if "tiny" in f else []).validate(world_size=world)  # tiny: shards given per run
        ds = deepspeed_config(cfg, world)
        assert ds["train_batch_size"] == cfg.data.micro_batch_size * cfg.train.grad_accum_steps, f


def test_deepspeed_json_is_generated_from_the_config():
    cfg = load_config(TINY, OK + ["parallel.sequence_parallel_size=2", "parallel.zero_stage=3",
                                  "train.grad_accum_steps=3", "train.precision=bf16", "deepspeed.bf16.foo=1",
                                  "deepspeed.zero_optimization.offload_optimizer.device=cpu"])
    ds = deepspeed_config(cfg, world_size=8)
    # DeepSpeed's data-parallel world is DP = 8 / 2: SP ranks share a batch
    assert ds["train_batch_size"] == 2 * 3 * 4 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": True, "foo": 1}  # pass-through keys merge into generated sections
    assert ds["zero_optimization"] == {"stage": 3, "reduce_scatter": False, "offload_optimizer": {"device": "cpu"}}
    # plain fp32 without ZeRO: our optimizer clips (DeepSpeed's clipping off)
    assert deepspeed_config(load_config(TINY, OK), 1)["gradient_clipping"] == 0.0


def test_resolved_config_round_trips(tmp_path):
    for path in (TINY, MEGALODON_TINY):      # a Megalodon run's saved config keeps its model_type
        cfg = load_config(path, OK + ["train.lr=0.5"])
        cfg.save(str(tmp_path / "c.yaml"))
        again = load_config(str(tmp_path / "c.yaml"))
        assert again == cfg and again.to_dict() == cfg.to_dict() and type(again.model) is type(cfg.model)
    assert again.model.model_type == "megalodon" and "model_type" not in load_config(TINY, OK).to_dict()["model"]
    assert Config().checkpoint_dir == os.path.join("runs/default", "checkpoints")


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    (tmp_path / "l.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(tmp_path / "l.yaml"))
