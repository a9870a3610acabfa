"""Run by the export tests with a given interpreter (transformers 4.57 here, or the cached 5.x venv):

    python tests/hf/remote_check.py HF_DIR REF.pt OUT.json [--native] [--without triton,liger_kernel]
        [--no-heads]

Loads HF_DIR with the Auto classes (trust_remote_code=True; --native: also without it), and writes JSON with the
max logit difference to REF.pt's megatrain logits (an input length that is not a multiple of chunk_size), the
greedy ids of generate(), whether the folder's AutoTokenizer gives REF.pt's ids on its probe strings (if it has
them), and for each downstream head: output shape, loss, and whether the backward reached the
backbone. No megatrain import: this is what a downstream user has. --without: those packages are not importable
(as on a CPU machine without triton), from before anything is imported. --no-heads: skip the four heads.
"""
import json
import sys
import warnings

WITHOUT = sys.argv[sys.argv.index("--without") + 1].split(",") if "--without" in sys.argv else []
for _name in WITHOUT:
    # as if not installed: importlib.util.find_spec(name) is None, `import name` (or name.sub) raises
    # ModuleNotFoundError -- what transformers' and megatrain's availability checks see on such a machine
    sys.modules[_name] = None

import torch  # noqa: E402
import transformers  # noqa: E402

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
out_dir, ref_path, res_path = sys.argv[1:4]
ref = torch.load(ref_path)
x, want = ref["x"], ref["logits"]
res = {"version": transformers.__version__, "without": WITHOUT}
m = transformers.AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True).eval()
with torch.no_grad():
    res["remote_diff"] = (m(x).logits - want).abs().max().item()
    res["generate"] = m.generate(ref["prompt"], max_new_tokens=ref["new"], do_sample=False).tolist()
    res["lengths_ok"] = all(m(x[:, :n]).logits.shape[1] == n for n in (1, 3, 9, 17))
if ref.get("probes"):  # the folder's tokenizer as this transformers reads it (5.x: tokenizer.json)
    tok = transformers.AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True)
    res["tokenizer_ok"] = [tok(s, add_special_tokens=False)["input_ids"] == ids
                           for s, ids in zip(ref["probes"], ref["probe_ids"])]
if "--native" in sys.argv:
    n = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    res["native_class"] = type(n).__module__
    L = ref["chunk"] * 2
    with torch.no_grad():
        res["native_diff"] = (n(x[:, :L], use_cache=False).logits - want[:, :L]).abs().max().item()
heads = {"AutoModelForSequenceClassification": dict(labels=torch.tensor([0, 1])),
         "AutoModelForTokenClassification": dict(labels=torch.zeros_like(x)),
         "AutoModelForQuestionAnswering": dict(start_positions=torch.tensor([1, 2]),
                                               end_positions=torch.tensor([3, 4])),
         "AutoModelForMultipleChoice": dict(labels=torch.tensor([1, 0]))}
res["heads"] = {}
for auto, labels in ({} if "--no-heads" in sys.argv else heads).items():
    h = getattr(transformers, auto).from_pretrained(out_dir, trust_remote_code=True)
    h.train()
    inp = torch.stack([x, x.roll(3, dims=1)], dim=1) if "MultipleChoice" in auto else x  # 2 different choices
    o = h(input_ids=inp, **labels)
    o.loss.backward()
    emb = h.get_input_embeddings().weight
    logits = o.logits if getattr(o, "logits", None) is not None else o.start_logits
    res["heads"][auto] = {"class": type(h).__name__, "shape": list(logits.shape), "loss": o.loss.item(),
                          "backbone_grad": bool(emb.grad is not None and emb.grad.abs().sum() > 0)}
with open(res_path, "w") as f:
    json.dump(res, f)
