"""Every ```python snippet of README.md and docs/*.md runs as written (CPU, its own namespace), and the
user-facing documents stand on their own (links resolve inside the repository, no pointers outside it).

A snippet that cannot run on a CPU-only machine carries a marker comment with the reason, e.g.
``# readme: skip (needs a GPU)``; markers are for the exceptions only (see MAX_SKIPPED_FRACTION).
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SKIP_MARKER = re.compile(r"#\s*readme:\s*skip\b\s*(\((?P<reason>[^)]*)\))?")
#: at most this fraction of all snippets may be skipped
MAX_SKIPPED_FRACTION = 0.25
FENCE_OPEN = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
PYTHON_LANGS = ("python", "py", "python3")
#: phrases about the project's own history, not facts a user can act on
HISTORY_PHRASES = ("so far", "was lent", "were lent", "this session", "no task so far")


def snippets(path: Path):
    """``[(first line number, code)]`` of the ```python fences of a Markdown file (indented fences too)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE_OPEN.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang = opening.group("indent"), opening.group("lang")
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if lang in PYTHON_LANGS:
            body = "\n".join(line[len(indent):] if line.startswith(indent) else line
                             for line in lines[i + 1:end])
            found.append((i + 2, textwrap.dedent(body)))
        i = end + 1
    return found


ALL = [(path, line, code) for path in DOCUMENTS for line, code in snippets(path)]


def _id(item):
    path, line, _ = item
    return f"{path.relative_to(ROOT)}:{line}"


def test_the_readme_has_python_snippets():
    assert any(path.name == "README.md" and path.parent == ROOT for path, _, _ in ALL)


@pytest.mark.parametrize("item", ALL, ids=[_id(item) for item in ALL])
def test_snippet_runs_as_written(item):
    path, line, code = item
    marker = SKIP_MARKER.search(code)
    if marker:
        pytest.skip(f"marked in {_id(item)}: {marker.group('reason')}")
    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    # compiled with the Markdown file's name and line offset so a traceback points at the document
    exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)


def test_skip_markers_are_rare_and_say_why():
    marked = [(item, SKIP_MARKER.search(item[2])) for item in ALL if SKIP_MARKER.search(item[2])]
    for item, marker in marked:
        assert marker.group("reason") and marker.group("reason").strip(), \
            f"{_id(item)}: a skip marker needs a reason, e.g. '# readme: skip (needs a GPU)'"
    assert len(marked) <= MAX_SKIPPED_FRACTION * len(ALL), \
        f"{len(marked)} of {len(ALL)} snippets are skipped: {[_id(i) for i, _ in marked]}"


def test_snippet_extraction_handles_indented_fences(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n  ```python\n  a = 1\n  b = a + 1\n  ```\n\n```bash\nls\n```\n```py\nc = 3\n```\n")
    assert snippets(doc) == [(4, "a = 1\nb = a + 1"), (12, "c = 3")]


LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


@pytest.mark.parametrize("path", DOCUMENTS, ids=[str(p.relative_to(ROOT)) for p in DOCUMENTS])
def test_documents_stand_on_their_own(path):
    text = path.read_text(encoding="utf-8")
    for outside in ("../shared", "shared/spec", "losses.md", "architecture.md", "ci.md"):
        assert outside not in text, f"{path.name} points at {outside}, which is not in the repository"
    for phrase in HISTORY_PHRASES:
        assert phrase not in text.lower(), f"{path.name}: say what is measured, not {phrase!r}"
    for link in LINK.finditer(text):
        target = link.group("target").split("#")[0]
        if not target or re.match(r"^[a-z]+:", target):
            continue  # an anchor in the same file, or a URL
        assert (path.parent / target).exists(), f"{path.name}: broken link {link.group(0)}"


def test_the_readme_links_to_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/README.md" in readme
    assert (ROOT / "docs" / "README.md").exists()


def test_a_build_without_torch_says_loudly_what_it_skipped():
    """``pip install .`` (build isolation: no torch in the build environment) must not skip the C++
    extension silently: setup.py prints what it skipped and the command that builds it."""
    import subprocess
    import sys
    hide_torch = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
                  "runpy.run_path('setup.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", hide_torch], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in __import__("os").environ.items()
                                            if k != "KDKERNELS_REQUIRE_EXT"})
    assert done.returncode == 0, done.stderr
    assert "SKIPPED the C++ extension kdkernels._C" in done.stderr
    assert "pip install --no-build-isolation ." in done.stderr and "python -m kdkernels.info" in done.stderr


def test_info_says_how_to_build_a_missing_extension():
    """``python -m kdkernels.info`` in an install without ``kdkernels._C`` gives the build command."""
    import subprocess
    import sys
    without_ext = "import sys; sys.modules['kdkernels._C'] = None; import runpy; runpy.run_module('kdkernels.info', run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", without_ext], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kdkernels._C is not built" in done.stdout and "pip install --no-build-isolation" in done.stdout
