"""transformers' own ModelTesterMixin, from the sdist of the running transformers, on the exported classes of both
families: MEGA's seven, Megalodon's two.

Run (what tests/hf/test_hf_mixin.py does, with this python's transformers; not collected by a plain `pytest tests`):
    d=$(python -m tests.hf.tf_tests)     # fetch transformers' tests/ for this version (tests/hf/tf_tests.py)
    MEGATRAIN_TF_TESTS=$d PYTHONPATH=. python -m pytest -q -p no:cacheprovider tests/hf/mixin_suite.py
    ... -k Export       the exported remote-code classes only;   -k Native   transformers 4.57's own MEGA only
    ... -k Megalodon    Megalodon's export only (mixin and generation)

Two unittest classes run the same mixin with the same tester (MegaModelTester, ours): MegaExportModelTest on the
classes an export ships, loaded as trust_remote_code loads them (megatrain/hf/remote_code.py writes the folder,
transformers' dynamic-module loader imports it: no megatrain import in those classes), and MegaNativeModelTest on
transformers' own deprecated MEGA (4.x only; skipped where transformers has none). MegalodonExportModelTest runs
the mixin on Megalodon's export (MegalodonModelTester; transformers has no Megalodon to compare with). The
generation checks (GenerationChecks) run for both families: MegaGenerationTest, MegalodonGenerationTest.
KNOWN_GAPS below is the one list of mixin tests not run on an export, per family, each with why.

The sdists do not ship tests/generation/ (GenerationTesterMixin; see tests/hf/tf_tests.py): generate is covered
by tests/hf/test_hf_citizen.py (greedy, beam search, left padding) until a registry source for that mixin exists.
"""
from __future__ import annotations

import os
import sys
import tempfile
import unittest

import torch

_DIR = os.environ.get("MEGATRAIN_TF_TESTS")
if not _DIR:
    raise RuntimeError("set MEGATRAIN_TF_TESTS to the folder `python -m tests.hf.tf_tests` prints")
sys.path.insert(0, _DIR)

import transformers  # noqa: E402
from transformers_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask  # noqa: E402

TF_MAJOR = int(transformers.__version__.split(".")[0])
# per family: (its config class, then each exported class with the transformers auto mapping (table) that names
# its task); the order of the MEGA tuple is transformers' own
FAMILIES = {
    "mega": ("MegaConfig", (("MegaModel", "MODEL_MAPPING_NAMES", "AutoModel"),
                            ("MegaForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
                            ("MegaForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
                            ("MegaForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                             "AutoModelForSequenceClassification"),
                            ("MegaForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
                             "AutoModelForTokenClassification"),
                            ("MegaForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
                             "AutoModelForQuestionAnswering"),
                            ("MegaForMultipleChoice", "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
                             "AutoModelForMultipleChoice"))),
    "megalodon": ("MegalodonConfig", (("MegalodonModel", "MODEL_MAPPING_NAMES", "AutoModel"),
                                      ("MegalodonForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                                       "AutoModelForCausalLM"))),
}
CLASS_NAMES = tuple(name for name, _, _ in FAMILIES["mega"][1])

# Mixin tests an exported family does not run, with why (the one place; test_hf_mixin.py reports them):
# family -> {name -> (the transformers majors it applies to, why)}
_NO_GENERATION_MIXIN = ((4, 5), "GenerationTesterMixin is not in transformers' sdist (tests/generation/ is not "
                        "shipped): the check would test a placeholder")
KNOWN_GAPS = {
    "mega": {"test_generation_tester_mixin_inheritance": _NO_GENERATION_MIXIN},
    "megalodon": {"test_generation_tester_mixin_inheritance": _NO_GENERATION_MIXIN},
}


def _remote_classes(family: str):
    """A family's exported classes as trust_remote_code loads them: a folder of shipped code, transformers' loader;
    the mixin learns each class's task from transformers' auto mappings (5.x dropped MEGA's rows, no version has
    Megalodon's: rows added in this test process only) and the Auto classes some mixin tests load a saved folder
    with learn the classes (what an export's auto_map does for a trust_remote_code user)."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.models.auto import configuration_auto
    from transformers.models.auto import modeling_auto as ma

    from megatrain.hf.remote_code import write_remote_code
    d = tempfile.mkdtemp(prefix=f"{family}_remote_")
    write_remote_code(d, family)
    config_name, classes = FAMILIES[family]
    config = get_class_from_dynamic_module(f"configuration_{family}.{config_name}", d)
    loaded = tuple(get_class_from_dynamic_module(f"modeling_{family}.{name}", d) for name, _, _ in classes)
    for (name, table, _), cls in zip(classes, loaded):
        getattr(ma, table).setdefault(family, name)
    if family not in configuration_auto.CONFIG_MAPPING_NAMES:
        AutoConfig.register(family, config)
        for (_, _, auto), cls in zip(classes, loaded):
            getattr(ma, auto).register(config, cls)
    return config, loaded


EXPORT_CONFIG, EXPORT_CLASSES = _remote_classes("mega")
MEGALODON_CONFIG, MEGALODON_CLASSES = _remote_classes("megalodon")
if hasattr(transformers, "MegaModel"):
    NATIVE_CONFIG, NATIVE_CLASSES = transformers.MegaConfig, tuple(getattr(transformers, n) for n in CLASS_NAMES)
else:
    NATIVE_CONFIG, NATIVE_CLASSES = None, ()


class _Tester:
    """A family's tester: tiny config kwargs (self.kwargs) and inputs for the mixins; token_types: its models take
    token_type_ids."""

    token_types = False

    def get_config(self):
        return self.config_class(**self.kwargs)

    def prepare_config_and_inputs_for_common(self):
        torch.manual_seed(0)
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_ids[input_ids == 1] = 3  # no pad id inside the inputs (1 is the pad token)
        inputs = {"input_ids": input_ids, "attention_mask": random_attention_mask([self.batch_size, self.seq_length])}
        if self.token_types:
            inputs["token_type_ids"] = ids_tensor([self.batch_size, self.seq_length], 2)
        return self.get_config(), inputs


class MegaModelTester(_Tester):
    """Tiny MEGA configs and inputs for the mixins (ours: transformers' MEGA tests left with the model)."""

    token_types = True

    def __init__(self, parent, config_class, batch_size=3, seq_length=8, vocab_size=99, hidden_size=16,
                 num_hidden_layers=2, intermediate_size=24, ema_projection_size=4, shared_representation_size=8,
                 nffn_hidden_size=24, num_labels=3, num_choices=2, use_chunking=False, chunk_size=-1,
                 is_decoder=False):
        self.parent = parent
        self.config_class = config_class
        self.batch_size, self.seq_length = batch_size, seq_length
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = 1  # MEGA: one attention head
        self.num_labels, self.num_choices = num_labels, num_choices
        self.is_training = True
        self.kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                           intermediate_size=intermediate_size, ema_projection_size=ema_projection_size,
                           shared_representation_size=shared_representation_size, nffn_hidden_size=nffn_hidden_size,
                           use_chunking=use_chunking, chunk_size=chunk_size, is_decoder=is_decoder,
                           bidirectional=not is_decoder, max_positions=64,
                           add_token_type_embeddings=True, type_vocab_size=2, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, initializer_range=0.02)



class _MixinTest(ModelTesterMixin):
    config_class = None
    all_model_classes = ()
    model_tester_class = None
    test_pruning = False
    test_head_masking = False
    test_torchscript = False
    test_resize_position_embeddings = False
    fx_compatible = False

    def setUp(self):
        if not self.all_model_classes:
            self.skipTest("this transformers has no such classes")
        self.model_tester = self.model_tester_class(self, self.config_class)


class _MegaMixinTest(_MixinTest):
    model_tester_class = MegaModelTester


class MegaExportModelTest(_MegaMixinTest, unittest.TestCase):
    config_class = EXPORT_CONFIG
    all_model_classes = EXPORT_CLASSES


def _skip_known_gaps(cls, family: str) -> None:
    for name, (majors, why) in KNOWN_GAPS[family].items():
        if TF_MAJOR in majors:
            setattr(cls, name, unittest.skip(f"KNOWN_GAPS: {why}")(lambda self: None))


_skip_known_gaps(MegaExportModelTest, "mega")


class MegaNativeModelTest(_MegaMixinTest, unittest.TestCase):
    config_class = NATIVE_CONFIG
    all_model_classes = NATIVE_CLASSES


class GenerationChecks:
    """What GenerationTesterMixin would check of an exported causal LM (ours: that mixin is not in the sdist):
    greedy decoding with the cache equals the argmax of full forwards without it (cache reuse), a forward with
    use_cache=True returns the cache a next forward continues from, seeded sampling repeats and top_k=1 sampling
    is greedy, beam search returns distinct beams, a left-padded row with its attention_mask generates what it
    generates alone, and contrastive search is refused for the stateful cache. A family's test sets `causal_class`
    and `make_tester(chunk_size)` (its tester of a causal LM; chunks of 4: generation crosses chunk boundaries)."""

    causal_class = None
    # chunk size of the left-padding check: the padding must not move chunk boundaries (megatrain.generate's
    # docstring), so the prompt and what follows fit in one chunk
    left_padding_chunk = 4

    def make_tester(self, chunk_size: int):
        raise NotImplementedError

    def setUp(self):
        self.tester = self.make_tester(chunk_size=4)
        torch.manual_seed(0)
        self.model = self.causal_class(self.tester.get_config()).eval()
        self.ids = ids_tensor([2, 6], self.tester.vocab_size)
        self.ids[self.ids < 3] = 3  # no bos/pad/eos inside the prompt

    def generate(self, model=None, ids=None, **kw):
        kw = {"max_new_tokens": 6, "eos_token_id": None, "pad_token_id": 1, "do_sample": False, **kw}
        with torch.no_grad():
            return (model or self.model).generate(self.ids if ids is None else ids, **kw)

    def test_greedy_with_the_cache_is_the_argmax_of_full_forwards(self):
        out = self.generate()
        with torch.no_grad():
            logits = self.model(out[:, :-1]).logits  # no cache: the whole sequence at once
        self.assertEqual(out[:, 6:].tolist(), logits[:, 5:].argmax(-1).tolist())

    def test_use_cache_returns_a_cache_to_continue_from(self):
        with torch.no_grad():
            full = self.model(self.ids).logits
            first = self.model(self.ids[:, :5], use_cache=True)
            self.assertIsNotNone(first.past_key_values)
            last = self.model(self.ids[:, 5:], past_key_values=first.past_key_values).logits
        torch.testing.assert_close(first.logits, full[:, :5], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(last, full[:, 5:], atol=1e-5, rtol=1e-5)

    def test_sampling(self):
        torch.manual_seed(3)
        a = self.generate(do_sample=True, top_k=0)
        torch.manual_seed(3)
        self.assertEqual(a.tolist(), self.generate(do_sample=True, top_k=0).tolist())
        self.assertEqual(self.generate(do_sample=True, top_k=1).tolist(), self.generate().tolist())

    def test_beam_search(self):
        out = self.generate(num_beams=3, num_return_sequences=3, early_stopping=True)
        self.assertEqual(out.shape, (6, 12))
        self.assertEqual(len({tuple(r) for r in out[:3].tolist()}), 3)

    def test_left_padding_with_attention_mask(self):
        if self.left_padding_chunk != 4:
            torch.manual_seed(0)
            self.model = self.causal_class(self.make_tester(chunk_size=self.left_padding_chunk).get_config()).eval()
        padded = torch.cat([self.ids[:1], torch.cat([torch.full((1, 2), 1), self.ids[1:, 2:]], 1)])
        mask = torch.ones_like(padded)
        mask[1, :2] = 0
        out = self.generate(ids=padded, attention_mask=mask, output_scores=True, return_dict_in_generate=True)
        alone = self.generate(ids=self.ids[1:, 2:], output_scores=True, return_dict_in_generate=True)
        # The same logits at every step; the greedy tokens may part only at a tie those logits show (the prompts
        # are random: on another CPU the rounding of a near-tie can pick the other token, CI saw it once).
        for step, (got, want) in enumerate(zip(out.scores, alone.scores)):
            torch.testing.assert_close(got[1], want[0], atol=1e-4, rtol=1e-4)
            if out.sequences[1, 6 + step] != alone.sequences[0, 4 + step]:
                top2 = want[0].topk(2).values
                self.assertLess(float(top2[0] - top2[1]), 1e-4, f"the tokens part at step {step} without a tie")
                break
        self.assertEqual(len(out.scores), 6)

    def test_contrastive_search_is_refused_for_the_stateful_cache(self):
        with self.assertRaisesRegex(ValueError, "(?i)contrastive|stateful"):
            self.generate(penalty_alpha=0.6, top_k=4)


class MegaGenerationTest(GenerationChecks, unittest.TestCase):
    """GenerationChecks on MEGA's export; and under 4.x greedy decoding gives the tokens of transformers' own MEGA
    on the same weights (its full forwards: 4.57's MEGA has no working generate)."""

    causal_class = EXPORT_CLASSES[1]

    def make_tester(self, chunk_size=-1):
        return MegaModelTester(self, EXPORT_CONFIG, is_decoder=True, use_chunking=chunk_size > 0,
                               chunk_size=chunk_size)

    def native(self):
        if NATIVE_CONFIG is None:
            self.skipTest("this transformers has no native MEGA")
        native = NATIVE_CLASSES[1](NATIVE_CONFIG(**self.tester.kwargs)).eval()
        missing, _ = native.load_state_dict(self.model.state_dict(), strict=False)
        self.assertFalse([k for k in missing if "_float_tensor" not in k], missing)
        return native

    def test_greedy_is_native_megas_argmax(self):
        # 4.57's MegaForCausalLM cannot generate (no GenerationMixin; with one added, its legacy cache breaks
        # in generate): its full forwards without the cache are the oracle
        # without chunking: 4.57's chunked MEGA takes only whole chunks (or one shorter) without its cache
        self.tester = self.make_tester()
        torch.manual_seed(0)
        self.model = self.causal_class(self.tester.get_config()).eval()
        native = self.native()
        x = self.ids
        with torch.no_grad():
            for _ in range(6):
                x = torch.cat([x, native(x, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        self.assertEqual(self.generate().tolist(), x.tolist())


class MegalodonModelTester(_Tester):
    """Tiny Megalodon configs and inputs for the mixins (ours): two heads, chunks longer than the inputs (the
    attentions are then [B, heads, L, L], what the mixin checks), attention masks with holes (the timestep norm and
    the complex EMA skip masked positions)."""

    def __init__(self, parent, config_class, batch_size=3, seq_length=8, vocab_size=99, hidden_size=16,
                 num_hidden_layers=2, num_attention_heads=2, chunk_size=16):
        self.parent = parent
        self.config_class = config_class
        self.batch_size, self.seq_length = batch_size, seq_length
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.is_training = True
        self.kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                           num_attention_heads=num_attention_heads, shared_representation_size=8,
                           intermediate_size=16, nffn_hidden_size=24, cema_ndim=4, chunk_size=chunk_size,
                           norm_num_groups=4, pad_token_id=1, bos_token_id=0, eos_token_id=2)


class MegalodonExportModelTest(_MixinTest, unittest.TestCase):
    config_class = MEGALODON_CONFIG
    all_model_classes = MEGALODON_CLASSES
    model_tester_class = MegalodonModelTester


_skip_known_gaps(MegalodonExportModelTest, "megalodon")


class MegalodonGenerationTest(GenerationChecks, unittest.TestCase):
    causal_class = MEGALODON_CLASSES[1]
    left_padding_chunk = 16  # RoPE is relative and padding counts nowhere: one chunk, the same tokens

    def make_tester(self, chunk_size=4):
        return MegalodonModelTester(self, MEGALODON_CONFIG, chunk_size=chunk_size)
