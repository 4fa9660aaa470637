"""Table-driven, invertible renaming of state-dict keys by prefix.

Every map in this package (UNet, autoencoder, text encoder) is a list of `Rule`s: a block-level
prefix pair plus an optional table for the first component(s) after the prefix. The same table read
backwards gives the inverse map, so the two directions cannot drift apart. (The name tables follow
diffusers `loaders/single_file_utils.py` and `scripts/convert_diffusers_to_original_stable_diffusion.py`;
the mechanism is ours.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """Rename keys starting with `src` to start with `dst`; `sub` renames the part right after it.

    With `sub` set, the remainder of the key must start with one of its entries, otherwise the key
    counts as unmapped: a ResBlock's sub-module names are a closed set, and a stray name there means
    the checkpoint is not the architecture we think it is.
    """

    src: str
    dst: str
    sub: tuple[tuple[str, str], ...] | None = None

    def inverted(self) -> Rule:
        """The same rule read from `dst` to `src`."""
        sub = None if self.sub is None else tuple((b, a) for a, b in self.sub)
        return Rule(self.dst, self.src, sub)


class KeyMap:
    """An ordered set of rules applied by longest matching prefix (the most specific rule wins)."""

    def __init__(self, rules: Iterable[Rule]):
        # Longest prefix first: `output_blocks.2.1.conv.` must win over `output_blocks.2.1.`.
        """Keep the rules sorted so that the most specific prefix is tried first."""
        self.rules = sorted(rules, key=lambda r: len(r.src), reverse=True)

    def inverted(self) -> KeyMap:
        """The inverse map (dst -> src)."""
        return KeyMap(r.inverted() for r in self.rules)

    def rename(self, key: str) -> str | None:
        """The new name of `key`, or None when no rule covers it."""
        for rule in self.rules:
            if not key.startswith(rule.src):
                continue
            rest = key[len(rule.src) :]
            if rule.sub is None:
                return rule.dst + rest
            # Longest sub-prefix first, for the same reason as above.
            for old, new in sorted(rule.sub, key=lambda p: len(p[0]), reverse=True):
                if rest.startswith(old):
                    return rule.dst + new + rest[len(old) :]
            return None
        return None

    def apply(self, state_dict: Mapping[str, torch.Tensor], *, what: str, strict: bool = True) -> StateDict:
        """Rename every key; with `strict`, raise KeyError listing the keys no rule covers."""
        out: StateDict = {}
        unmapped = []
        for key, value in state_dict.items():
            new = self.rename(key)
            if new is None:
                unmapped.append(key)
                continue
            if new in out:
                raise KeyError(f"{what}: two keys map to {new!r}; the key table is ambiguous")
            out[new] = value
        if unmapped and strict:
            shown = ", ".join(sorted(unmapped)[:8]) + (", ..." if len(unmapped) > 8 else "")
            raise KeyError(
                f"{what}: {len(unmapped)} key(s) have no counterpart ({shown}); "
                "the checkpoint does not have the expected architecture"
            )
        return out


def indices_after(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted distinct integers `N` in keys of the form `prefix + "N." + ...` (block counts from keys)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return sorted(found)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Keys under `prefix` with the prefix removed (the rest dropped)."""
    n = len(prefix)
    return {k[n:]: v for k, v in state_dict.items() if k.startswith(prefix)}


def add_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """All keys with `prefix` put in front."""
    return {prefix + k: v for k, v in state_dict.items()}
