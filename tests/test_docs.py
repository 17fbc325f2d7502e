"""The docs site: it builds strictly (a broken link, a missing anchor or a page left out of the nav fails),
its generated reference pages are current, and the README stays a front door (≤ 200 lines)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MKDOCS = Path(sys.executable).parent / "mkdocs"
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}


def build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "--config-file", str(root / "mkdocs.yml"), "--site-dir", str(site)],
        capture_output=True, text=True, env=ENV, timeout=300,
    )


def test_reference_pages_are_current() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gen-reference.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    proc = build(REPO, tmp_path / "site")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    assert (tmp_path / "site" / "reference" / "crd" / "index.html").exists()


def test_the_build_fails_on_a_broken_link_a_bad_anchor_and_a_page_missing_from_the_nav(tmp_path: Path) -> None:
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / "index.md").open("a") as f:
        f.write("\n[gone](no-such-page.md) [anchor](concepts.md#no-such-heading)\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Not in the nav\n")
    proc = build(tmp_path, tmp_path / "site")
    assert proc.returncode != 0
    for needle in ("no-such-page.md", "#no-such-heading", "orphan.md"):
        assert needle in proc.stderr, needle


def test_readme_is_a_front_door() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for command in ("make demo", "make test"):
        assert command in readme
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert any(link.startswith("docs/") for link in links)
    missing = [link for link in links if not link.startswith("http") and not (REPO / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
