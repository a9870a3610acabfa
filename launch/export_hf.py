"""Export a megatrain checkpoint as a Hugging Face folder (optionally push it to the Hub).

    python launch/export_hf.py runs/x/checkpoints hf_out/             # latest checkpoint of the run
    python launch/export_hf.py runs/x/checkpoints/step00001000 hf_out/ --push-to-hub user/mega-demo
The folder loads with transformers' AutoModelForCausalLM / AutoModelForMaskedLM (see megatrain/convert/hf.py).
The run's tokenizer folder (``data.tokenizer``), if set, is copied alongside.
"""
import argparse
import os
import shutil
import sys

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.convert.hf import save_hf  # noqa: E402
from megatrain.convert.checkpoint import load_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint dir (its latest) or one tag dir")
    p.add_argument("out", help="output folder")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hub repo")
    a = p.parse_args(argv)
    model, cfg = load_model(a.checkpoint)
    save_hf(model, a.out)
    tok = cfg.data.tokenizer
    if tok and os.path.isdir(tok):
        for f in os.listdir(tok):
            if os.path.isfile(os.path.join(tok, f)) and not os.path.exists(os.path.join(a.out, f)):
                shutil.copy2(os.path.join(tok, f), a.out)
    print(f"exported {a.checkpoint} -> {a.out}")
    if a.push_to_hub:
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo(a.push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=a.out, repo_id=a.push_to_hub)
        print(f"pushed to https://huggingface.co/{a.push_to_hub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
