"""The documentation: one page per registered method, every code path it names exists, and the
site builds with ``mkdocs build --strict`` (what ``make test`` runs), which fails on a broken link."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfsup.pretrain.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CODE_DIRS = ("pretrain", "eval", "augment", "launch", "selfsup", "tests", "benchmarks", "configs", "docs")
CODE_PATH = re.compile(rf"`((?:{'|'.join(CODE_DIRS)})/[\w./-]+\.(?:py|yaml|yml|sh|sbatch|md|txt|toml|npz))`")


def nav_pages(nav: list) -> set[str]:
    pages: set[str] = set()
    for item in nav:
        for value in item.values() if isinstance(item, dict) else [item]:
            pages |= nav_pages(value) if isinstance(value, list) else {value}
    return pages


def missing_method_pages(names, docs: Path = DOCS) -> list[str]:
    """Registered methods without ``docs/methods/<name>.md`` or without a place in the nav."""
    nav = nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    return sorted(n for n in names if not (docs / "methods" / f"{n}.md").is_file() or f"methods/{n}.md" not in nav)


def missing_code_paths(text: str) -> list[str]:
    """Repository paths in backticks (``pretrain/data/factors.py``) that do not exist."""
    return sorted({p for p in CODE_PATH.findall(text) if not (ROOT / p).exists()})


def doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "SLURM.md", ROOT / "SCALING.md", *sorted(DOCS.rglob("*.md"))]


def test_every_registered_method_has_a_page_in_the_nav() -> None:
    assert len(METHODS) >= 15
    assert missing_method_pages(METHODS) == []
    # negative control: a method registered without a page is reported by name
    assert missing_method_pages([*METHODS, "planted_method_without_page"]) == ["planted_method_without_page"]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_path_a_page_names_exists(path: Path) -> None:
    assert missing_code_paths(path.read_text()) == []


def test_the_path_check_catches_a_stale_pointer() -> None:
    assert missing_code_paths("Details: `pretrain/factors.py`, `pretrain/data/factors.py`") == ["pretrain/factors.py"]


def test_readme_is_a_front_page_whose_links_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert "make demo" in text and "make test" in text
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links and [lk for lk in links if "://" not in lk and not (ROOT / lk).exists()] == []


def _build(root: Path) -> subprocess.CompletedProcess:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    return subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(root / "site")],
                          cwd=root, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_site_builds_strict_and_a_broken_link_fails_it(tmp_path: Path) -> None:
    for name in ("mkdocs.yml", "SLURM.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(DOCS, tmp_path / "docs", symlinks=True)
    ok = _build(tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    with (tmp_path / "docs" / "benchmarks.md").open("a") as f:  # planted: a dead anchor and page
        f.write("\n[gone](data.md#no-such-section) [gone too](no_such_page.md)\n")
    broken = _build(tmp_path)
    assert broken.returncode != 0
    assert "no-such-section" in broken.stderr and "no_such_page.md" in broken.stderr
