"""Check a wheelhouse made by launch/wheelhouse.sh: every requirement of its wheels and of megasleep
itself (pyproject.toml), for the node's Python, is in the house at a version it allows, on the node
(``--node-has``) or left out on purpose (``--not-needed``). Exit 1 naming each requirement that is
none of these (so a pin changed in pyproject.toml but not in the script is caught).

    python launch/wheelhouse_check.py DIR PYTHON_VERSION --node-has torch numpy ... --not-needed ...
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def wheel_metadata(whl: Path) -> tuple[str, str, list[str]]:
    """(distribution name, version, its Requires-Dist lines) from the wheel's METADATA."""
    with zipfile.ZipFile(whl) as z:
        meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            raise SystemExit(f"wheelhouse: {whl} has no .dist-info/METADATA: not a wheel")
        lines = z.read(meta).decode("utf-8", "replace").splitlines()
    field = {key: line.split(":", 1)[1].strip() for line in lines for key in ("Name", "Version")
             if line.startswith(f"{key}:")}
    if len(field) < 2:
        raise SystemExit(f"wheelhouse: {whl}: METADATA lacks Name or Version")
    return field["Name"], field["Version"], [line.split(":", 1)[1].strip() for line in lines
                                             if line.startswith("Requires-Dist:")]


def missing(house_dir: Path, python_version: str, node_has: list[str], not_needed: list[str],
            pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "extra": ""}
    house, needs = {}, []
    for whl in sorted(house_dir.glob("*.whl")):
        name, version, reqs = wheel_metadata(whl)
        house[canonicalize_name(name)] = version
        needs += [(whl.name, r) for r in reqs]
    needs += [(pyproject.name, r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    elsewhere = {canonicalize_name(n) for n in [*node_has, *not_needed]}
    out: dict[str, set[str]] = {}
    for who, text in needs:
        req, name = Requirement(text), canonicalize_name(Requirement(text).name)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        if name in house:
            if not req.specifier.contains(house[name], prereleases=True):
                out.setdefault(f"{name} {house[name]} in the house, not {req.specifier}", set()).add(who)
        elif name not in elsewhere:
            out.setdefault(name, set()).add(who)
    return [f"{what} (needed by {', '.join(sorted(who))})" for what, who in sorted(out.items())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("house", type=Path)
    ap.add_argument("python_version")
    ap.add_argument("--node-has", nargs="*", default=[])
    ap.add_argument("--not-needed", nargs="*", default=[])
    a = ap.parse_args(argv)
    gaps = missing(a.house, a.python_version, a.node_has, a.not_needed)
    if gaps:
        print(f"wheelhouse: {a.house}: neither in it nor assumed on the node (NODE_HAS in launch/wheelhouse.sh): "
              + "; ".join(gaps), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
