"""README.md, docs/, params.yaml and the code's docstrings name only paths, modules and pages that exist.

A renamed module or a moved file leaves its old name in prose that no import checks; this test reads every
such name and resolves it against the repository.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("tasks", "flows", "benchmarks", "tests", "docs", "configs", "chat_templates", "data/builtin", ".ci")
PATH = re.compile(r"(?<![\w./<-])((?:" + "|".join(map(re.escape, SOURCE_FOLDERS)) + r")/[\w./<>*{}-]*[\w/>*}])")
MODULE = re.compile(r"(?<![\w./-])((?:tasks|flows|benchmarks)(?:\.\w+)+)(?::(\w+))?")
LINK = re.compile(r"\]\(([^)\s]+)\)")
PLACEHOLDER = re.compile(r"<|\*|\{|rK\b|\.\.\.")


def prose_files() -> dict[str, str]:
    """Every text a reader (or an error message) sends users by: README, docs pages, params.yaml, docstrings."""
    texts = {"README.md": (ROOT / "README.md").read_text(), "params.yaml": (ROOT / "params.yaml").read_text()}
    texts |= {str(page.relative_to(ROOT)): page.read_text() for page in sorted((ROOT / "docs").glob("*.md"))}
    for folder in ("tasks", "flows", "benchmarks", "data"):
        for module in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(module.read_text())
            nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef))]
            texts[str(module.relative_to(ROOT))] = "\n".join(filter(None, map(ast.get_docstring, nodes)))
    return texts


def module_file(dotted: str) -> tuple[Path | None, list[str]]:
    """The longest prefix of `dotted` that is a module of the repository, and the attribute names after it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate, parts[cut:]
    return None, parts


def defines(module: Path, name: str) -> bool:
    tree = ast.parse(module.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef) and node.name == name:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
        if isinstance(node, ast.ImportFrom | ast.Import) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a markdown page's headings (lower case, punctuation dropped, spaces to dashes)."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def unresolved_names(where: str, text: str) -> list[str]:
    missing = []
    for path in PATH.findall(text):
        if not PLACEHOLDER.search(path) and not (ROOT / path.rstrip("/.")).exists():
            missing.append(f"{where}: path {path}")
    for dotted, attribute in MODULE.findall(text):
        module, rest = module_file(dotted)
        rest = rest + ([attribute] if attribute else [])
        if module is None or (rest and not defines(module, rest[0])):
            missing.append(f"{where}: module {dotted}{':' + attribute if attribute else ''}")
    if where.endswith(".md"):
        for target in LINK.findall(text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            page = (ROOT / where).parent / file if file else ROOT / where
            if not page.exists():
                missing.append(f"{where}: link {target}")
            elif anchor and page.suffix == ".md" and anchor not in heading_anchors(page):
                missing.append(f"{where}: link {target} (no such heading)")
    return missing


def test_every_path_module_and_link_named_in_the_docs_exists():
    missing = [name for where, text in prose_files().items() for name in unresolved_names(where, text)]
    assert not missing, "names that do not resolve:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see `tasks/lib/params_docs.py`", "path tasks/lib/params_docs.py"),
        ("rendered by `tasks.lib.params_docs`", "module tasks.lib.params_docs"),
        ("`tasks.lib.distributed.no_such_helper`", "module tasks.lib.distributed.no_such_helper"),
        ("[gone](docs/nowhere.md)", "link docs/nowhere.md"),
        ("[vllm](docs/gpu.md#no-such-heading)", "link docs/gpu.md#no-such-heading (no such heading)"),
    ],
)
def test_a_stale_name_is_caught(text, expected):
    assert f"README.md: {expected}" in unresolved_names("README.md", text)


def test_names_that_exist_pass():
    text = (
        "`tasks/lib/schema.py`, `tasks.lib.distributed.map_batches`, `benchmarks.story_judge:graded`, "
        "[pipeline](docs/pipeline.md), [vLLM](docs/gpu.md#sampling-with-vllm), `metrics/rounds/rK/pairs.json`"
    )
    assert unresolved_names("README.md", text) == []
