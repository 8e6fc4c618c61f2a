"""The README and the MkDocs site: the README stays short, its links and the site's nav point at
pages that exist, and no file names the internal brief. The strict site build itself is
``make docs``."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 200
#: Built from parts so that this file does not contain the name it looks for.
FORBIDDEN = "MISSION" + ".md"
#: Markdown links and images: ``[text](target)`` / ``![alt](target)``.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


class _IgnoreTags(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads tags such as ``!!python/name:...`` as plain values."""


_IgnoreTags.add_multi_constructor("", lambda loader, suffix, node: None)


def mkdocs_config() -> dict:
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_IgnoreTags)


def nav_files(nav) -> list[str]:
    """Every page path in an mkdocs ``nav`` (nested lists of ``{title: path or list}``)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in nav_files(value)]
    return []


def local_targets(text: str) -> list[str]:
    """Link targets that are files of this repository (no URLs, no same-page anchors)."""
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_readme_is_at_most_200_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move material into docs/"


def test_readme_links_point_at_files_that_exist():
    targets = local_targets((ROOT / "README.md").read_text())
    assert any(t.startswith("docs/") for t in targets)  # the README links into the docs
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_no_file_names_the_internal_brief():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(command, cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    offenders = []
    for name in filter(None, listed):
        path = ROOT / name
        if not path.is_file():
            continue  # deleted in the working tree, or a submodule
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        if FORBIDDEN in data.decode("utf-8", errors="replace"):
            offenders.append(name)
    assert not offenders, f"files naming {FORBIDDEN}: {offenders}"


def test_mkdocs_nav_lists_only_pages_that_exist_and_every_page():
    config = mkdocs_config()
    docs_dir = ROOT / config.get("docs_dir", "docs")
    pages = nav_files(config["nav"])
    assert pages and "index.md" in pages
    missing = [p for p in pages if not (docs_dir / p).is_file()]
    assert not missing, f"mkdocs.yml nav lists missing pages: {missing}"
    assert len(pages) == len(set(pages)), "a page is listed twice in the nav"
    unlisted = sorted(str(p.relative_to(docs_dir)) for p in docs_dir.rglob("*.md"))
    unlisted = [p for p in unlisted if p not in pages]
    assert not unlisted, f"pages missing from the nav: {unlisted}"


def test_docs_links_stay_inside_docs_and_resolve():
    """mkdocs' strict build rejects links out of docs/: repository files are named as inline code."""
    problems = []
    for page in sorted(DOCS.rglob("*.md")):
        for target in local_targets(page.read_text()):
            resolved = (page.parent / target).resolve()
            if not resolved.is_relative_to(DOCS.resolve()):
                problems.append(f"{page.relative_to(ROOT)}: {target} is outside docs/")
            elif not resolved.exists():
                problems.append(f"{page.relative_to(ROOT)}: {target} does not exist")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", ["budget_curve.png", "convergence.png"])
def test_docs_plots_are_the_committed_results(name):
    """The evidence page shows copies of the budget table's plots; they must match the results."""
    source = ROOT / "benchmarks" / "results" / "budget-cpu-plateau" / name
    assert (DOCS / "images" / name).read_bytes() == source.read_bytes(), f"copy {source} to docs/images/"
