"""Names in prose: every `module.name` that the code's comments and strings (docstrings, messages)
or the Markdown docs give for one of the project's modules exists, so that a renamed or removed
function leaves no stale reference behind."""

import glob
import importlib
import os
import re
import tokenize

from standins import ROOT

PACKAGES = ("models", "world", "tools")
# short name -> module: gvu, eval_geneval and every module of the packages, found when collected
MODULES = {"gvu": "gvu", "eval_geneval": "eval_geneval"} | {
    name: f"{package}.{name}"
    for package in PACKAGES
    for name in (os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, package, "*.py")))
    if name != "__init__"
}
# runio.read_prompts or tools.runio.read_prompts; not obj.runio.x (an attribute of something else),
# nor tools/runio.py (a path)
REFERENCE = re.compile(
    rf"(?<![\w./-])(?:(?:{'|'.join(PACKAGES)})\.)?({'|'.join(MODULES)})\.([A-Za-z_]\w*)"
)
FILE_SUFFIXES = {"py", "json", "jsonl", "md", "txt", "png", "pt", "safetensors", "log", "lock"}


def python_texts(path):
    """(line, text) of each line of every comment and string literal (docstrings, messages) of a
    Python file; escapes such as \\n read as a space."""
    kinds = {
        tokenize.COMMENT,
        tokenize.STRING,
        getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING),
    }
    with open(path, encoding="utf-8") as f:
        for tok in tokenize.generate_tokens(f.readline):
            if tok.type in kinds:
                for i, text in enumerate(tok.string.splitlines()):
                    yield tok.start[0] + i, re.sub(r"\\[ntr]", " ", text)


def markdown_texts(path):
    with open(path, encoding="utf-8") as f:
        yield from enumerate(f, 1)


def sources():
    """The project's Python files and Markdown docs, relative to the repository."""
    py = glob.glob("*.py", root_dir=ROOT) + [
        p for d in PACKAGES + ("tests",) for p in glob.glob(f"{d}/*.py", root_dir=ROOT)
    ]
    md = glob.glob("*.md", root_dir=ROOT) + glob.glob("*/*.md", root_dir=ROOT)
    return sorted(py), sorted(md)


def test_every_module_name_named_in_comments_and_docs_exists():
    """Each reference such as gvu.main, runio.read_prompts or adapters.load_umm in a comment, a
    string or a doc is an attribute of that module; a missing one is reported as file:line: name."""
    py, md = sources()
    assert "gvu.py" in py and "README.md" in md and MODULES["runio"] == "tools.runio"
    missing, seen = [], 0
    for paths, texts in ((py, python_texts), (md, markdown_texts)):
        for path in paths:
            for line, text in texts(os.path.join(ROOT, path)):
                for m in REFERENCE.finditer(text):
                    short, name = m.groups()
                    if name in FILE_SUFFIXES:  # gvu.py, gvu.json: a file
                        continue
                    seen += 1
                    if not hasattr(importlib.import_module(MODULES[short]), name):
                        missing.append(f"{path}:{line}: {short}.{name}")
    assert seen > 50  # the scan finds the references there are
    assert not missing, "names that do not exist:\n" + "\n".join(missing)


def test_every_repository_path_named_in_the_docs_exists():
    """Each path into the project's code and docs folders that the Markdown docs name, such as
    `tests/test_runio.py` or `tests/test_adapters.py::test_name`, exists (and so does the test).
    (configs/ and prompts/ are left out: the docs also name other repositories' files there.)"""
    folders = "tests|tools|models|world|docs"
    path = re.compile(rf"(?<![\w./-])((?:{folders})/[\w./-]+\.\w+)(?:::(\w+))?")
    missing = []
    for md in sources()[1]:
        for n, line in markdown_texts(os.path.join(ROOT, md)):
            for rel, test in path.findall(line):
                full = os.path.join(ROOT, rel)
                if not os.path.exists(full) or test and f"def {test}(" not in open(full).read():
                    missing.append(f"{md}:{n}: {rel}{'::' + test if test else ''}")
    assert not missing, "\n".join(missing)
