"""The list of packages and gettext catalogs reserved for independent evaluation.

It lives next to the repository (`../shared/heldout-packages.txt`), not in it. The harvest never
downloads a reserved package, and nothing reads a reserved catalog (NAME.mo / NAME.po), wherever
it is found: only the list itself is ever read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


class ReservedListError(ValueError):
    """The reserved list cannot be parsed."""


DEFAULT_RESERVED_LIST = Path("../shared/heldout-packages.txt")


def default_reserved_list() -> Path:
    """The reserved list next to this checkout (REPO/../shared/...), else relative to the cwd."""
    checkout = Path(__file__).resolve().parents[1]
    candidate = (checkout / DEFAULT_RESERVED_LIST).resolve()
    return candidate if candidate.is_file() else DEFAULT_RESERVED_LIST


@dataclasses.dataclass(frozen=True)
class ReservedList:
    """Packages (never downloaded) and gettext domains (never read, wherever they are found)
    reserved for independent evaluation. Only the list itself is read, never the catalogs."""

    packages: frozenset[str] = frozenset()
    catalogs: frozenset[str] = frozenset()
    path: str = ""

    @classmethod
    def load(cls, path: Path) -> "ReservedList":
        packages: set[str] = set()
        catalogs: set[str] = set()
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            kind, _, name = line.partition(" ")
            name = name.strip()
            if kind == "package" and name:
                packages.add(name)
            elif kind == "catalog" and name:
                catalogs.add(name)
            else:
                raise ReservedListError(f"{path}:{number}: expected 'package NAME' or 'catalog NAME', got {line!r}")
        return cls(frozenset(packages), frozenset(catalogs), str(path))

    def summary(self) -> dict[str, object]:
        return {"path": self.path, "packages_listed": len(self.packages), "catalogs_listed": len(self.catalogs)}
