"""The package as a user meets it: exports, old import paths, version, what importing loads, type
information and license, the README and docs."""
from __future__ import annotations

import importlib
import importlib.metadata
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import pyunlearn

ROOT = Path(__file__).resolve().parents[1]


def test_all_names_exist():
    for name in pyunlearn.__all__:
        assert getattr(pyunlearn, name) is not None, name
    for package in (pyunlearn.kernels, pyunlearn.store, pyunlearn.recording, pyunlearn.unlearn, pyunlearn.evaluation):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"


MOVED = sorted(__import__("pyunlearn._deprecated")._deprecated.MOVED.items())


@pytest.mark.parametrize("old, new", MOVED)
def test_moved_modules_still_import_with_a_deprecation_warning(old, new):
    """The previous version's import paths, as users wrote them, for one more version. In this
    process, with the old name forgotten first (test_old_paths_in_a_fresh_interpreter imports
    them where nothing else was imported)."""
    attribute = old.split(".")[1]
    saved = sys.modules.pop(old, None), vars(pyunlearn).pop(attribute, None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(DeprecationWarning) as warned:
                importlib.import_module(old)
            assert str(warned.value) == f"{old} moved to {new}; the old path goes away in the next version"
            warnings.simplefilter("ignore")
            m = importlib.import_module(old)
        assert m is importlib.import_module(new)
        assert getattr(pyunlearn, attribute) is m
    finally:
        sys.modules.pop(old, None)
        vars(pyunlearn).pop(attribute, None)
        if saved[0] is not None:
            sys.modules[old] = saved[0]
        if saved[1] is not None:
            setattr(pyunlearn, attribute, saved[1])


_OLD_PATHS = r"""
import importlib, warnings
warnings.simplefilter("error")
import pyunlearn
from pyunlearn._deprecated import MOVED
for old, new in sorted(MOVED.items()):
    try:
        importlib.import_module(old)
    except DeprecationWarning as w:
        print("warned", w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = importlib.import_module(old)
    print(m is importlib.import_module(new), getattr(pyunlearn, old.split(".")[1]) is m)
"""


def test_old_paths_in_a_fresh_interpreter():
    """Warnings as errors in an interpreter that imported nothing else: importing pyunlearn
    warns nothing; each old path warns once, then is the new module, also as an attribute."""
    out = subprocess.run([sys.executable, "-c", _OLD_PATHS], capture_output=True, text=True, check=True)
    expected = []
    for old, new in MOVED:
        expected += [f"warned {old} moved to {new}; the old path goes away in the next version", "True True"]
    assert out.stdout.splitlines() == expected, out.stdout + out.stderr


def test_the_top_level_is_the_public_face_and_nothing_defines_errors_elsewhere():
    """At most 12 modules beside the subpackages; every Exception and Warning class in errors.py;
    no module imports a name another module keeps private."""
    import ast

    package = ROOT / "pyunlearn"
    assert len(list(package.glob("*.py"))) <= 12, sorted(p.name for p in package.glob("*.py"))
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and path.name != "errors.py":
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                assert not bases & {"Exception", "Warning", "UserWarning", "RuntimeError", "ValueError",
                                    "PyunlearnError", "RecorderError", "StoreError"}, f"{path}: {node.name}"
            if isinstance(node, ast.ImportFrom) and node.module is not None and node.level:
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                # importing a private *module* of the same package is fine (from . import _native)
                modules = {p.stem for p in path.parent.glob("_*.py")} | {"_native", "_native_cuda"}
                assert not set(private) - modules, f"{path}: from {node.module} imports {private}"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = getattr(node.value, "id", "")
                assert owner not in {"ops", "backends", "reference", "checks", "torch_ops", "store_module"}, \
                    f"{path}:{node.lineno}: {owner}.{node.attr}"


def test_one_version():
    assert pyunlearn.__version__ == importlib.metadata.version("pyunlearn")


def test_import_does_not_load_the_extension():
    code = "import sys, pyunlearn; print('pyunlearn.kernels._native' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_package_ships_type_information_and_its_license():
    import importlib.resources
    from pathlib import Path

    assert importlib.resources.files("pyunlearn").joinpath("py.typed").is_file()
    root = Path(__file__).resolve().parents[1]
    assert 'pyunlearn = ["py.typed"]' in (root / "pyproject.toml").read_text()  # shipped in wheels too
    license_text = (root / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert 'license = { text = "Apache-2.0" }' in (root / "pyproject.toml").read_text()


# The pages whose ```python blocks must run as written (```text blocks are not run), and the
# pages whose links must resolve inside the repository.
DOC_PAGES = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
LINKED_PAGES = DOC_PAGES + ["CHANGELOG.md", "benchmarks/README.md"]


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / page).read_text(), flags=re.S | re.M)


_BLOCKS = [(page, i) for page in DOC_PAGES for i in range(len(_python_blocks(page)))]


def test_the_docs_pages_exist():
    pages = ("docs/format.md", "docs/guide.md", "docs/integrations.md", "docs/kernels.md", "docs/methods.md")
    assert set(pages) <= set(DOC_PAGES)
    assert all(_python_blocks(page) for page in ("README.md", *pages))


@pytest.mark.parametrize("page, block", _BLOCKS, ids=[f"{page}-{i}" for page, i in _BLOCKS])
def test_doc_snippet_runs(page, block, tmp_path, monkeypatch):
    """Each block runs alone, in a fresh working directory, as a reader would paste it."""
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_blocks(page)[block], f"{page} block {block}", "exec"), {})


def test_the_readme_blocks_run_one_after_the_other(tmp_path, monkeypatch):
    """A newcomer pastes the README's examples in order into one session, in one folder: no
    block may trip over what an earlier one left (a store of the same name, say)."""
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(_python_blocks("README.md")):
        exec(compile(block, f"README.md block {i}", "exec"), {})


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _links(text: str) -> list[str]:
    prose = _prose(text)
    inline = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)
    reference = re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", prose, flags=re.M)
    autolinks = re.findall(r"<([a-z][a-z0-9+.-]*:[^>\s]*)>", prose)
    return inline + reference + autolinks


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*?)\s*$", _prose(text), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", LINKED_PAGES)
def test_doc_links_resolve_inside_the_repository(page):
    source = ROOT / page
    text = source.read_text()
    links = _links(text)
    for link in links:
        assert not re.match(r"[a-z][a-z0-9+.-]*:", link, flags=re.I), f"{page}: {link} points outside the repository"
        path, _, anchor = link.partition("#")
        target = (source.parent / path).resolve() if path else source
        assert target.is_relative_to(ROOT), f"{page}: {link} leaves the repository"
        assert target.relative_to(ROOT).parts[:1] != ("shared",), f"{page}: {link} points into shared/"
        assert target.exists(), f"{page}: {link} does not resolve ({target} is missing)"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target.read_text()), f"{page}: {link}: no heading #{anchor} in {path or page}"
    assert "http://" not in _prose(text) and "https://" not in _prose(text), f"{page} names a URL"


NAMED_PATH = re.compile(r"`((?:tests|benchmarks|pyunlearn|scripts|csrc|docs)/[\w./-]+?)(?:::\w+)?`")


@pytest.mark.parametrize("page", [p for p in LINKED_PAGES if p != "CHANGELOG.md"])  # history names files as they were
def test_the_files_the_docs_name_exist(page):
    """A path in backticks (`tests/store/test_sigkill.py`, `pyunlearn/store/digests.py`) names a
    file or folder of this repository: moved files must not leave the docs pointing at nothing."""
    named = set(NAMED_PATH.findall((ROOT / page).read_text()))
    missing = sorted(p for p in named if "*" not in p and not (ROOT / p.rstrip("/")).exists())
    assert not missing, f"{page} names files that do not exist: {missing}"


def test_link_checker_sees_links():
    links = _links("[a](docs/guide.md) `[b](x.md)`\n[c]: ref.md\n```text\n[d](y.md)\n```\n<https://z>")
    assert links == ["docs/guide.md", "ref.md", "https://z"]
    assert "bench_kernelspy-the-kernels" in _anchors("## bench_kernels.py: the kernels")


def test_readme_opens_with_the_two_commands():
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("bash scripts/dev.sh")]
    assert lines[:2] == ["bash scripts/dev.sh main", "bash scripts/dev.sh test"]
    assert "bash scripts/dev.sh test" in (ROOT / ".ci" / "run").read_text()


def test_plain_pytest_runs_everything_and_the_jobs_split_it_by_the_slow_marker():
    """`pytest` (scripts/dev.sh test, which CI runs) deselects nothing; test-fast and test-slow
    split the suite by the slow marker, and both halves hold tests (pytest exits 5 on none)."""
    addopts = re.search(r'^addopts = "(.*)"$', (ROOT / "pyproject.toml").read_text(), flags=re.M)[1]
    assert "-m" not in addopts.split() and "slow" not in addopts
    dev = (ROOT / "scripts" / "dev.sh").read_text()
    assert 'test) exec "${PYTEST[@]}" "$@" ;;' in dev
    assert 'test-fast) exec "${PYTEST[@]}" -m "not slow" "$@" ;;' in dev
    assert 'test-slow) exec "${PYTEST[@]}" -m slow "$@" ;;' in dev
    assert 'PYTEST=("$PY" -m pytest -q)' in dev and 'PYTEST+=(-n "$workers")' in dev
    marked = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py") if "pytest.mark.slow" in p.read_text()}
    assert "tests/store/test_sigkill.py" in marked and "tests/kernels/test_cuda_build.py" in marked
    assert len(marked) < len(list((ROOT / "tests").rglob("test_*.py")))
    assert "`bash scripts/dev.sh test-fast`" in " ".join((ROOT / "README.md").read_text().split())


def test_the_readmes_three_numbers_are_the_committed_results():
    """Each of the README's headline numbers is the value in the result file it cites, and that
    file names the commit the README gives (regenerate both together)."""
    import json

    text = " ".join((ROOT / "README.md").read_text().split())
    results = ROOT / "benchmarks" / "results"
    kernels = json.loads((results / "kernels.json").read_text())
    prune = next(r for r in kernels["results"] if r["kernel"].startswith("prune_topk") and r["keep"] == 0.01)
    store = json.loads((results / "store.json").read_text())
    resnet = next(r for r in store["sizes"] if r["model"].startswith("ResNet-18") and r["keep"] == 0.01)
    ledger = json.loads((results / "ledger.json").read_text())
    for claim, data in ((f"**{prune['speedup']:.1f}× faster**", kernels), (f"**{resnet['smaller_than_dense']:.1f}× smaller**", store),
                        (f"**{ledger['summary']['forget_10000_over_10']:.2f}×**", ledger)):
        assert claim in text, f"README.md does not say {claim}, what its result file holds"
        commit = data["meta"]["code"]["commit"]
        assert not data["meta"]["code"]["dirty"] and f"commit {commit[:7]}" in text, (claim, commit)


def test_the_guides_demo_output_is_the_committed_run():
    """docs/guide.md shows benchmarks/results/demo.txt, the demo's output at the commit its first
    line names: regenerate both together when the demo or a default changes."""
    recorded = (ROOT / "benchmarks" / "results" / "demo.txt").read_text().splitlines()
    assert recorded[0].startswith("$ pyunlearn demo    # at commit ")
    commit = recorded[0].split("at commit ")[1].split(",")[0]
    guide = (ROOT / "docs" / "guide.md").read_text()
    assert f"at commit {commit}," in guide
    block = re.search(r"^```text\n(Digits \(sklearn.*?)^```", guide, flags=re.S | re.M).group(1)
    assert block.strip("\n").splitlines() == "\n".join(recorded[1:]).strip("\n").splitlines()
