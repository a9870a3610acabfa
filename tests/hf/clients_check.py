"""Run by tests/hf/test_hf_clients.py with a given interpreter (transformers 4.57 here, or the cached 5.x venv):

    PYTHONPATH=. python tests/hf/clients_check.py SPEC.json OUT.json

Runs each client of megatrain.export.card.CLIENTS (the model card's "Works with" list) on the exports named in
SPEC.json ({"exports": {"FAMILY/TASK": DIR, ...}, "work": DIR, "inputs": {...}, "only": [...]}): its command
exactly as the card of that export prints it (Client.command_for: PATH_OR_REPO replaced by the export, the family's
LoRA targets; python: exec'd with the inputs its comments name; bash: run as a subprocess with this interpreter).
Then it records what the test compares with megatrain (losses, ids, scores, perplexities; LoRA's merged folder and
its logits; the fine-tuned folders and their logits) in OUT.json, one entry "NAME/FAMILY/TASK" per client and
export it applies to; a client that raises records {"error": traceback} and the others still run.
"""
import glob
import json
import os
import shlex
import subprocess
import sys
import traceback
import warnings

import torch

from megatrain.export.card import CLIENTS, FILL_MASK_TEXT, PPL_TASK


def run_card(client, folder: str, work: str, family: str, **inputs) -> dict:
    """The client's card command (as a `family` export's card prints it) on `folder`, run in `work`: the namespace
    it leaves (python)."""
    code = client.command_for(family, folder)
    for name, text in client.files:
        os.makedirs(os.path.dirname(os.path.join(work, name)) or work, exist_ok=True)
        with open(os.path.join(work, name), "w") as f:
            f.write(text)
    if client.lang == "bash":
        argv = shlex.split(code)
        # the console script belongs to whichever environment installed lm_eval: run its module with this python
        p = subprocess.run([sys.executable, "-m", argv[0].replace("-", "_"), *argv[1:]], cwd=work,
                           capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"{code}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        return {"stdout": p.stdout}
    ns = dict(inputs)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        exec(compile(code, f"<card: {client.name}>", "exec"), ns)
    finally:
        os.chdir(cwd)
    return ns


def _fine_tuned(ns, work, inputs) -> dict:
    """What a Trainer fine-tune leaves: the trainer's saved folder (megatrain's load_hf reads it) and its logits on a
    padded batch."""
    model = ns["trainer"].model
    ns["trainer"].save_model(os.path.join(work, "final"))
    batch = ns["tok"](inputs["texts"][:4], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    torch.save({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits": logits},
               os.path.join(work, "final_logits.pt"))
    return {"losses": [h["loss"] for h in ns["trainer"].state.log_history if "loss" in h],
            "final_dir": os.path.join(work, "final"), "logits": os.path.join(work, "final_logits.pt"),
            "class": type(model).__name__,
            # Trainer's flag reached megatrain's model (checkpointing applied from outside, as the trainer does)
            "checkpointing": bool(model.is_gradient_checkpointing and model._mt.config.gradient_checkpointing)}


def check_trainer_lm(c, folder, work, inputs, family):
    return _fine_tuned(run_card(c, folder, work, family, texts=inputs["texts"]), work, inputs)


def check_trainer(c, folder, work, inputs, family):
    ns = run_card(c, folder, work, family, texts=inputs["texts"], labels=inputs["labels"])
    return _fine_tuned(ns, work, inputs)


def check_peft_lora(c, folder, work, inputs, family):
    import transformers
    batches = [torch.tensor(b) for b in inputs["batches"]]
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ns = run_card(c, folder, work, family, batches=batches)
    merged = ns["model"].eval()  # get_peft_model wrapped it in place; merge_and_unload left it merged
    after = merged.state_dict()
    x = torch.cat(batches)
    with torch.no_grad():
        logits = merged(x).logits
        loss = [float(m(input_ids=x, labels=x).loss) for m in (base, merged)]
    torch.save({"x": x, "logits": logits}, os.path.join(work, "merged_logits.pt"))
    return {"merged_dir": os.path.join(work, "merged"), "logits": os.path.join(work, "merged_logits.pt"),
            "lora_left": sorted({type(m).__name__ for m in merged.modules() if "lora" in type(m).__module__}),
            "changed": sorted(k for k in before if k in after and not torch.equal(before[k], after[k])),
            "keys_equal": sorted(before) == sorted(after), "loss_base": loss[0], "loss_merged": loss[1]}


def check_text_generation(c, folder, work, inputs, family):
    ns = run_card(c, folder, work, family, prompt=inputs["prompt"])
    gen = ns["generate"]
    tokens = gen(inputs["prompt"], max_new_tokens=12, do_sample=False, return_tensors=True)
    return {"text": ns["out"][0]["generated_text"], "prompt_ids": gen.tokenizer(inputs["prompt"])["input_ids"],
            "generated_ids": [int(t) for t in tokens[0]["generated_token_ids"]],
            "decoded": gen.tokenizer.decode(tokens[0]["generated_token_ids"])}


def check_fill_mask(c, folder, work, inputs, family):
    ns = run_card(c, folder, work, family)
    return {"ids": ns["fill"].tokenizer(FILL_MASK_TEXT)["input_ids"],
            "top": [[int(o["token"]), float(o["score"])] for o in ns["out"]]}


def check_lm_eval(c, folder, work, inputs, family):
    with open(os.path.join(work, "docs.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in inputs["docs"])
    run_card(c, folder, work, family)
    files = glob.glob(os.path.join(work, "results", "**", "results_*.json"), recursive=True)
    if len(files) != 1:
        raise RuntimeError(f"lm_eval wrote {files} (expected one results file)")
    with open(files[0]) as f:
        r = json.load(f)["results"][PPL_TASK]
    return {k.split(",")[0]: v for k, v in r.items() if k.split(",")[0] in
            ("word_perplexity", "byte_perplexity", "bits_per_byte")}


CHECKS = {"trainer": check_trainer, "trainer-lm": check_trainer_lm, "peft-lora": check_peft_lora,
          "text-generation": check_text_generation, "fill-mask": check_fill_mask, "lm-eval": check_lm_eval}


def main(spec_path: str, out_path: str) -> None:
    import transformers
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    with open(spec_path) as f:
        spec = json.load(f)
    res = {"version": transformers.__version__}
    for c in CLIENTS:
        for name, folder in spec["exports"].items():
            family, task = name.split("/")
            key = f"{c.name}/{name}"
            if not c.applies(family, task) or (spec.get("only") and key not in spec["only"]):
                continue
            work = os.path.join(spec["work"], f"{c.name}-{family}-{task}")
            os.makedirs(work, exist_ok=True)
            try:
                res[key] = CHECKS[c.name](c, folder, work, spec["inputs"], family)
            except Exception:
                res[key] = {"error": traceback.format_exc()[-6000:]}
    with open(out_path, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
