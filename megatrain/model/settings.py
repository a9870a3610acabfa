"""What every family's config dataclass shares: field type checks, (de)serialization (written once).

    class MegaConfig(Settings): ...            # a dataclass; from_dict is the family's own (its unknown-key rules)
    cfg.check_field_types(bad)                 # bad(name, why) for the first field whose value has the wrong type
    cfg.to_dict(); cfg.to_json_file(path); Cls.from_json_file(path); cfg.replace(**changes); Cls.field_names()
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable


class Settings:
    """Mixin for a config dataclass (see the module docstring)."""

    def check_field_types(self, bad: Callable[[str, str], None]) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", "Optional[int]") and v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                bad(f.name, "must be an int")
            if f.type == "bool" and not isinstance(v, bool):
                bad(f.name, "must be a bool")
            if f.type in ("float", "Optional[float]") and v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float))
            ):
                bad(f.name, "must be a number")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike):
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(d)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
