"""Ship megatrain's own model code with an export: the import closure, flattened, with relative imports.

    from megatrain.hf.remote_code import save_remote, write_remote_code
    why_not_native = save_remote(model, "hf_out/")    # weights, config.json + auto_map, the model's family's code
    files = write_remote_code("hf_out/", "megalodon")  # configuration_megalodon.py, modeling_megalodon.py + ...
Tests: PYTHONPATH=. python -m pytest -q tests/hf/test_remote_code.py

Each family ships its own closure (SHIPPED[family], an explicit list the closure test keeps equal to what its
wrapper modules import): its model code and what the families share (model/lm.py, the attention and loss ops, the
shared wrapper mechanics hf/remote/wrapper.py, the key map hf/keymap.py), never the other family's model.
transformers' remote-code loader imports a folder's files as one flat package and follows only relative imports
(`from .name import x`) between files of that folder. So, starting from the wrapper modules
(megatrain.hf.remote/), every megatrain module they import (found with `ast`, at any depth: lazy imports
inside functions too) is copied as `megatrain_a_b_c.py` for `megatrain.a.b.c` (a package's __init__.py as the
package's name), and each megatrain import is rewritten to a relative one:
    from megatrain.a.b import X       ->  from .megatrain_a_b import X
    from megatrain.a import b         ->  from . import megatrain_a_b as b   (b a module; plus a `from .` line the
                                                                             loader can see, in an `if False:`)
    from .c import X (inside megatrain) -> resolved first, then as above
Imports of third-party packages other than torch/transformers/numpy/safetensors/huggingface_hub/tokenizers
(e.g. triton, imported by kernel files) are wrapped in `try: ... except ImportError: raise`: the same behaviour,
but transformers' import check (which skips try blocks) does not refuse to load the folder where the package
is absent; such kernels are only used where they run (megatrain/ops/backend.py).
Anything that cannot be rewritten fails loudly (RemoteCodeError): `import megatrain.x` used as an attribute
chain, `megatrain` names left in the code, dynamic imports of megatrain modules, two modules flattening to one
name, an import statement sharing a line with other code.
"""
from __future__ import annotations

import ast
import json
import os
import re
import sys
from typing import Optional

import torch

from megatrain.hf.format import FORMATS, save_hf

PACKAGE = "megatrain"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds megatrain/
# per family: the wrapper modules and their file names in the export (auto_map refers to these)
ROOTS = {
    "mega": {"megatrain.hf.remote.configuration_mega": "configuration_mega",
             "megatrain.hf.remote.modeling_mega": "modeling_mega"},
    "megalodon": {"megatrain.hf.remote.configuration_megalodon": "configuration_megalodon",
                  "megatrain.hf.remote.modeling_megalodon": "modeling_megalodon"},
}
# per family: the megatrain modules an export ships (see the module docstring): the roots and everything they
# import -- each family's own model code, what the families share, never the other family
_SHARED = (
    "megatrain.hf.keymap",
    "megatrain.hf.remote.wrapper",
    "megatrain.model.boundary",
    "megatrain.model.context",
    "megatrain.model.layers",
    "megatrain.model.lm",
    "megatrain.model.pieces",
    "megatrain.model.segments",
    "megatrain.model.settings",
    "megatrain.ops.attention",
    "megatrain.ops.attention.activations",
    "megatrain.ops.attention.flex_path",
    "megatrain.ops.attention.reference",
    "megatrain.ops.attention.torch_path",
    "megatrain.ops.backend",
    "megatrain.ops.ema",
    "megatrain.ops.ema.paths",
    "megatrain.ops.ema.reference",
    "megatrain.ops.ema.state",
    "megatrain.ops.ema.torch_blocked",
    "megatrain.ops.ema.triton_chunked",
    "megatrain.ops.ema.triton_kernel",
    "megatrain.ops.lm_loss",
    "megatrain.ops.lm_loss.blockwise",
    "megatrain.ops.lm_loss.liger",
    "megatrain.ops.lm_loss.reference",
    "megatrain.parallel.checkpointing",  # gradient_checkpointing_enable(): imports only torch and model/
)
SHIPPED = {
    "mega": tuple(sorted(_SHARED + (
        "megatrain.hf.mega",
        "megatrain.hf.remote.configuration_mega",
        "megatrain.hf.remote.modeling_mega",
        "megatrain.model.mega.attention",
        "megatrain.model.mega.backbone",
        "megatrain.model.mega.blocks",
        "megatrain.model.mega.config",
        "megatrain.model.mega.ema",
        "megatrain.model.mega.heads",
        "megatrain.model.mega.lm",
    ))),
    "megalodon": tuple(sorted(_SHARED + (
        "megatrain.hf.megalodon",
        "megatrain.hf.remote.configuration_megalodon",
        "megatrain.hf.remote.modeling_megalodon",
        "megatrain.model.mega.config",  # HF_GENERIC_KEYS: the transformers config keys both families ignore
        "megatrain.model.megalodon.attention",
        "megatrain.model.megalodon.backbone",
        "megatrain.model.megalodon.cema",
        "megatrain.model.megalodon.config",
        "megatrain.model.megalodon.lm",
        "megatrain.model.megalodon.norms",
        "megatrain.ops.cema",
        "megatrain.ops.cema.reference",
        "megatrain.ops.cema.triton_kernel",
        "megatrain.ops.tsn",
        "megatrain.ops.tsn.reference",
        "megatrain.ops.tsn.stats",
        "megatrain.ops.tsn.torch_blocked",
        "megatrain.ops.tsn.triton_kernel",
    ))),
}
FAMILIES = tuple(SHIPPED)
# packages any transformers environment has: imported as they are
REQUIRED = {"torch", "transformers", "numpy", "safetensors", "huggingface_hub", "tokenizers"}
HEADER = "# Copied from megatrain ({src}) by megatrain/hf/remote_code.py: do not edit, re-export instead.\n"


_LOOKS_LIKE_IMPORT = re.compile(r"^\s*(from\s+\S+\s+import|import\s+\S+\s*$)")


class RemoteCodeError(ValueError):
    """A megatrain module the packager cannot ship as remote code (the message names file and line)."""


def module_file(name: str) -> Optional[str]:
    """Source file of megatrain module `name` (a package: its __init__.py), or None if no such module."""
    base = os.path.join(ROOT, *name.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def flat_name(name: str) -> str:
    for roots in ROOTS.values():
        if name in roots:
            return roots[name]
    return name.replace(".", "_")


def _is_package(name: str) -> bool:
    f = module_file(name)
    return f is not None and os.path.basename(f) == "__init__.py"


def _absolute(node: ast.ImportFrom, current: str) -> str:
    if not node.level:
        return node.module or ""
    pkg = current if _is_package(current) else current.rsplit(".", 1)[0]
    parts = pkg.split(".")
    if node.level - 1 >= len(parts):
        raise RemoteCodeError(f"{module_file(current)}:{node.lineno}: relative import beyond the {PACKAGE} package")
    base = parts[:len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _third_party_optional(top: str) -> bool:
    return top not in REQUIRED and top not in sys.stdlib_module_names and top != "__future__"


def _rewrite(name: str, source: str) -> tuple[str, set[str]]:
    """(the rewritten source of module `name`, the megatrain modules it imports)."""
    where = module_file(name)
    tree = ast.parse(source, where)
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, list[str]]] = []  # (first line, last line) 1-based -> replacement lines
    deps: set[str] = set()
    hidden: set[str] = set()  # `from . import m` targets: listed again for transformers' loader

    def whole_lines(node) -> str:
        first, last = lines[node.lineno - 1], lines[node.end_lineno - 1]
        if first[:node.col_offset].strip() or last[node.end_col_offset:].strip().split("#")[0].strip():
            raise RemoteCodeError(f"{where}:{node.lineno}: an import sharing its line with other code "
                                  "cannot be rewritten; put it on its own line")
        return first[:node.col_offset]

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
            if any(_ours(m) for m in mods):
                raise RemoteCodeError(f"{where}:{node.lineno}: `import {', '.join(mods)}` cannot be shipped as "
                                      f"remote code; use `from {PACKAGE}.x import y`")
            if any(_third_party_optional(m.split(".")[0]) for m in mods):
                ind = whole_lines(node)
                body = "".join(lines[node.lineno - 1:node.end_lineno]).strip()
                edits.append((node.lineno, node.end_lineno, _guarded(ind, body)))
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, name)
            if not _ours(target):
                if node.level == 0 and _third_party_optional(target.split(".")[0]):
                    ind = whole_lines(node)
                    body = "".join(lines[node.lineno - 1:node.end_lineno]).strip()
                    edits.append((node.lineno, node.end_lineno, _guarded(ind, body)))
                continue
            ind = whole_lines(node)
            new = []
            if module_file(target) is None:
                raise RemoteCodeError(f"{where}:{node.lineno}: no module {target!r}")
            attrs = []
            for a in node.names:
                if a.name == "*":
                    raise RemoteCodeError(f"{where}:{node.lineno}: `from {target} import *` cannot be shipped")
                sub = f"{target}.{a.name}"
                if module_file(sub) is not None:  # a submodule: import the flat module under the same name
                    deps.add(sub)
                    hidden.add(flat_name(sub))
                    new.append(f"{ind}from . import {flat_name(sub)} as {a.asname or a.name}\n")
                else:
                    attrs.append(a.name if not a.asname else f"{a.name} as {a.asname}")
            if attrs:
                deps.add(target)
                new.insert(0, f"{ind}from .{flat_name(target)} import {', '.join(attrs)}\n")
            edits.append((node.lineno, node.end_lineno, new))
        elif isinstance(node, ast.Call):
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if fname in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str) and _ours(node.args[0].value):
                raise RemoteCodeError(f"{where}:{node.lineno}: dynamic import of {node.args[0].value!r} "
                                      "cannot be shipped as remote code")
    for first, last, new in sorted(edits, reverse=True):
        lines[first - 1:last] = new
    out = "".join(lines)
    out += _listing(sorted(hidden))
    check = ast.parse(out, where)
    for n in ast.walk(check):
        if isinstance(n, ast.Name) and n.id == PACKAGE:
            raise RemoteCodeError(f"{where}:{n.lineno}: uses the name {PACKAGE!r}, which remote code does not have")
    # transformers 4.x finds a file's imports with line regexes, docstrings included: a usage line such as
    # "    from megatrain.model import X" in a docstring would make it demand a `megatrain` package
    real = {ln for n in ast.walk(check) if isinstance(n, (ast.Import, ast.ImportFrom))
            for ln in range(n.lineno, n.end_lineno + 1)}
    out_lines = out.splitlines(keepends=True)
    for i, ln in enumerate(out_lines, 1):
        if i not in real and _LOOKS_LIKE_IMPORT.match(ln):
            stripped = ln.lstrip()
            out_lines[i - 1] = ln[:len(ln) - len(stripped)] + ">>> " + stripped
    out = "".join(out_lines)
    return HEADER.format(src=os.path.relpath(where, ROOT)) + out, deps


def _listing(flat_names: list) -> str:
    if not flat_names:
        return ""
    return ("\n\nif False:  # transformers' remote-code loader finds a folder's files by `from .x import` lines\n"
            + "".join(f"    from .{h} import __name__ as _unused  # noqa: F401\n" for h in flat_names))


def _guarded(ind: str, stmt: str) -> list[str]:
    body = "\n".join(ind + "    " + ln.strip() for ln in stmt.splitlines())
    return [f"{ind}try:  # optional outside the import check (see megatrain/hf/remote_code.py)\n",
            body + "\n", f"{ind}except ImportError:\n", f"{ind}    raise\n"]


def closure(family: str = "mega", shipped=None) -> dict[str, str]:
    """{megatrain module name: rewritten source} for every module `family` ships (`shipped`: instead of
    SHIPPED[family]); RemoteCodeError if one imports a megatrain module that is not shipped, or a root is missing."""
    roots = ROOTS[family]
    shipped = set(SHIPPED[family] if shipped is None else shipped)
    missing = sorted(set(roots) - shipped)
    if missing:
        raise RemoteCodeError(f"{missing[0]} is a remote-code root but not in SHIPPED[{family!r}] ({__name__})")
    out: dict[str, str] = {}
    for name in sorted(shipped):
        path = module_file(name)
        if path is None:
            raise RemoteCodeError(f"SHIPPED[{family!r}] names {name!r}, which is no megatrain module ({__name__})")
        with open(path, encoding="utf-8") as f:
            out[name], deps = _rewrite(name, f.read())
        extra = sorted(deps - shipped)
        if extra:
            raise RemoteCodeError(f"{os.path.relpath(path, ROOT)} imports {extra[0]}, which a {family} export does not "
                                  f"ship: add it to SHIPPED[{family!r}] in megatrain/hf/remote_code.py if the model "
                                  "needs it, or drop the import")
    flat: dict[str, str] = {}
    for name in out:
        if flat_name(name) in flat:
            raise RemoteCodeError(f"{name} and {flat[flat_name(name)]} both flatten to {flat_name(name)}.py")
        flat[flat_name(name)] = name
    for root in roots:
        # transformers copies a local folder's files only as far as the loaded file's *direct* relative imports
        # reach: each root names the whole closure
        others = sorted(flat_name(n) for n in out if n != root)
        out[root] += _listing(others)
    return out


def imported_closure(family: str = "mega") -> set[str]:
    """The megatrain modules the family's roots import, followed through the import graph (what SHIPPED[family]
    must equal)."""
    seen: set[str] = set()
    todo = list(ROOTS[family])
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        with open(module_file(name), encoding="utf-8") as f:
            todo.extend(sorted(_rewrite(name, f.read())[1] - seen))
    return seen


def write_remote_code(out_dir: str, family: str = "mega") -> list[str]:
    """Write the family's flattened closure into out_dir; returns the file names written."""
    files = []
    for name, src in sorted(closure(family).items()):
        fname = flat_name(name) + ".py"
        with open(os.path.join(out_dir, fname), "w", encoding="utf-8") as f:
            f.write(src)
        files.append(fname)
    return files


def auto_map(family: str = "mega", model_type: Optional[str] = None) -> dict:
    """The auto_map of a `family` export whose config.json says `model_type` (default: the family's name): the
    configuration class of that model_type, every Auto class the modeling module offers."""
    import importlib
    conf, modeling = ROOTS[family]
    config_classes = importlib.import_module(conf).CONFIG_CLASSES
    m = {"AutoConfig": f"{ROOTS[family][conf]}.{config_classes[model_type or family]}"}
    m.update({auto: f"{ROOTS[family][modeling]}.{cls}"
              for auto, cls in importlib.import_module(modeling).AUTO_CLASSES.items()})
    return m


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def save_remote(model, out_dir: str, dtype: str = "fp32") -> Optional[str]:
    """A model (any family) as a remote-code folder: config.json (+ auto_map, dtype), model.safetensors,
    generation_config.json and the family's shipped code. Returns why transformers' own classes must not load it
    (None: transformers 4.57's MEGA may)."""
    family = model.config.model_type
    why = FORMATS[family].native_problem(model.config)
    if dtype != "fp32":
        model = model.to(DTYPES[dtype])
    save_hf(model, out_dir, native=False)
    with open(os.path.join(out_dir, "config.json")) as f:
        d = json.load(f)
    d["auto_map"] = auto_map(family, d["model_type"])
    d["torch_dtype"] = d["dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    c = model.config
    gen = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
           "_from_model_config": True}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2, sort_keys=True)
    write_remote_code(out_dir, family)
    return why
