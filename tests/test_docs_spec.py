"""The contracts travel with the repository: docs/spec/*.md are byte-for-byte copies of the shared
specs (../shared/spec relative to the repo root, when that folder exists), and the README links
them, never a path outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "spec"
SPECS = ("uplink-v1.md", "downlink-v1.md")


@pytest.mark.parametrize("name", SPECS)
def test_spec_copy_matches_the_shared_contract(name: str) -> None:
    """docs/spec/<name> equals ../shared/spec/<name> byte for byte (skipped without ../shared)."""
    if not (SHARED / name).is_file():
        pytest.skip(f"{SHARED} not present (a clone without the shared folder)")
    assert (ROOT / "docs" / "spec" / name).read_bytes() == (SHARED / name).read_bytes()


def test_readme_links_stay_inside_the_repository() -> None:
    """Every relative link in README.md and docs/operations.md resolves to a file in the repository."""
    for doc in (ROOT / "README.md", ROOT / "docs" / "operations.md"):
        links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
        local = [ln for ln in links if "://" not in ln and not ln.startswith("mailto:")]
        for link in local:
            target = (doc.parent / link).resolve()
            assert target.is_relative_to(ROOT), f"{doc.name} links outside the repository: {link}"
            assert target.exists(), f"{doc.name} links a missing file: {link}"
    readme = (ROOT / "README.md").read_text()
    assert "docs/spec/uplink-v1.md" in readme
    assert "docs/spec/downlink-v1.md" in readme
