"""The documentation runs: every Python snippet of the README and docs/, every command line, the site build.

Conventions in the Markdown (invisible on the rendered pages):

- ``<!-- test-setup`` ... ``-->``: Python run before the next snippets of the
  page, to make what they assume exists (your folders, a cached pretrained
  model: see ``tests/docs_setup.py``), small and offline.
- ``<!-- test-skip: reason -->`` right before a fence: the snippet needs what a
  test cannot have (GPUs, a network, your own files); it is compiled, not run.

The snippets of one page run in order in one namespace, in a fresh working
directory. Every ``timm-ood ...`` command line in a fence is parsed by the real
argument parser, so a renamed or removed option fails here.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import timm_ood

from . import docs_setup

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)")
_SKIP = re.compile(r"^<!-- test-skip: (.+?) -->$")


@dataclass(frozen=True)
class Snippet:
    kind: str  # "python", "setup", "bash", or another fence language
    code: str
    line: int
    skip: str | None = None


def snippets(page: Path) -> list[Snippet]:
    """The fenced blocks and hidden setups of a Markdown page, in order."""
    found: list[Snippet] = []
    lines = page.read_text().splitlines()
    skip, i = None, 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == "<!-- test-setup":
            end = lines.index("-->", i + 1)
            found.append(Snippet("setup", "\n".join(lines[i + 1:end]), i + 2))
            i = end + 1
            continue
        if match := _SKIP.match(line.strip()):
            skip = match.group(1)
        elif match := _FENCE.match(line):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            found.append(Snippet(match.group(1) or "text", "\n".join(lines[i + 1:end]), i + 2, skip))
            skip, i = None, end
        i += 1
    return found


def _pages_with(kinds: set[str]) -> list[Path]:
    """Pages with a snippet of these kinds that runs (pages whose every snippet is skipped are compiled only)."""
    return [page for page in PAGES if any(s.kind in kinds and not s.skip for s in snippets(page))]


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with({"python"}), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_snippets_run(page, tmp_path, monkeypatch, data_cache_dir, data_fashion_mnist, data_hub_offline):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__", "docs_setup": docs_setup, "monkeypatch": monkeypatch,
                 "tmp_path": tmp_path}
    ran = 0
    try:
        ran = _run_page(page, namespace)
    finally:
        timm_ood.reload_plugins()  # plugins a page registered at run time leave with it
    assert ran, f"{page.name}: every snippet is skipped"


def _run_page(page: Path, namespace: dict) -> int:
    ran = 0
    for snippet in snippets(page):
        if snippet.kind not in ("python", "setup"):
            continue
        where = f"{page.relative_to(ROOT)}:{snippet.line}"
        code = compile(snippet.code, where, "exec")
        if snippet.skip:
            continue
        try:
            exec(code, namespace)
        except Exception as error:
            pytest.fail(f"the snippet at {where} fails: {type(error).__name__}: {error}")
        ran += snippet.kind == "python"
    return ran


def _commands(code: str) -> list[list[str]]:
    """The ``timm-ood`` argument lists of a shell snippet (continuation lines joined, comments dropped)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        if "timm-ood " not in line and "timm_ood.cli" not in line:
            continue
        words = shlex.split(line, comments=True)
        for start, word in enumerate(words):
            if word == "timm-ood" or (word == "timm_ood.cli" and start and words[start - 1] == "-m"):
                commands.append(words[start + 1:])
                break
    return commands


COMMAND_PAGES = [page for page in [*PAGES, ROOT / "plugins" / "README.md"]
                 if any(_commands(s.code) for s in snippets(page) if s.kind in ("bash", "text"))]


@pytest.mark.parametrize("page", COMMAND_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_command_lines_parse(page, capsys):
    from timm_ood.cli import build_parser

    for snippet in snippets(page):
        if snippet.kind not in ("bash", "text"):
            continue
        for arguments in _commands(snippet.code):
            try:
                build_parser().parse_args(arguments)
            except SystemExit:
                pytest.fail(f"{page.relative_to(ROOT)}:{snippet.line}: `timm-ood {' '.join(arguments)}` does not "
                            f"parse: {capsys.readouterr().err.strip().splitlines()[-1]}")


def test_every_python_snippet_compiles():
    for page in PAGES:
        for snippet in snippets(page):
            if snippet.kind in ("python", "setup"):
                compile(snippet.code, f"{page.relative_to(ROOT)}:{snippet.line}", "exec")


def test_every_python_snippet_is_run_unless_it_says_why_not():
    skipped = [(page.name, s.line, s.skip) for page in PAGES for s in snippets(page)
               if s.kind == "python" and s.skip]
    assert all(reason and len(reason) > 10 for _, _, reason in skipped)
    ran = sum(s.kind == "python" and not s.skip for page in PAGES for s in snippets(page))
    assert ran > 2 * len(skipped), f"{len(skipped)} skipped snippets: {skipped}"


@pytest.mark.slow
def test_the_documentation_site_builds_without_warnings(tmp_path):
    """``mkdocs build --strict``: a broken link, a docstring that does not parse or a missing page fails."""
    pytest.importorskip("mkdocs")
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ,
                                                                          "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, build.stderr[-3000:]
    detectors = (tmp_path / "detectors" / "index.html").read_text()
    assert "<!-- timm-ood:detectors -->" not in detectors and "search space" in detectors
    assert "timm-ood demo" in (tmp_path / "cli" / "index.html").read_text()
