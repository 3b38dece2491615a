"""The one registry of op specs: every benchmark module's SPECS, and the --op selection."""
from __future__ import annotations

from . import contrastive, sortnet, sphere, swav, trainer

FAMILY_MODULES = {"contrastive": contrastive, "sphere": sphere, "sortnet": sortnet, "swav": swav,
                  "trainer": trainer}


def all_specs():
    return [s for mod in FAMILY_MODULES.values() for s in mod.SPECS]


def select_specs(names: list[str] | None):
    """--op: an op name selects the op; a family or module name its ops, unless it is also an
    op name (``sinkhorn`` is the op, ``swav`` the family)."""
    module_of = {s.name: m for m, mod in FAMILY_MODULES.items() for s in mod.SPECS}
    specs = all_specs()
    wanted = {n.strip() for arg in names or () for n in arg.split(",") if n.strip()}
    if not wanted:
        return specs
    known = {s.name for s in specs} | {s.family for s in specs} | set(FAMILY_MODULES)
    if unknown := sorted(wanted - known):
        raise SystemExit(f"--op: unknown op or family {unknown}; known: {sorted(known)}")
    groups = wanted - {s.name for s in specs}
    return [s for s in specs if s.name in wanted or s.family in groups
            or module_of[s.name] in groups]
