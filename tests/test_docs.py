"""The documentation covers the public API, and its code runs.

* Every name in the ``__all__`` of the public modules is listed in
  ``doc/api.rst``, so that it gets a reference page.
* Every public class and function, and every public method defined by a public
  class, has the numpydoc sections a user relies on: ``Parameters`` when it
  takes arguments (naming each of them), ``Returns`` (or ``Yields``) when it
  returns something, ``Attributes`` for estimators, and ``Examples`` for classes
  and functions.
* The code a reader copies runs as written: the README's example (and its
  paper-recipe constructor) and the getting-started page's blocks, in order.

The Sphinx build itself is not run here; CI builds the documentation separately.
Sections are parsed with ``numpydoc.docscrape`` when numpydoc is installed (it
comes with the ``doc`` extra), and otherwise by a minimal parser of numpydoc
section headers, so that the checks also run with the ``test`` extra alone.
"""

import ast
import importlib
import inspect
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
API_RST = ROOT / "doc" / "api.rst"

PUBLIC_MODULES = (
    "skpadim",
    "skpadim.covariance",
    "skpadim.datasets",
    "skpadim.feature_extraction",
    "skpadim.metrics",
    "skpadim.model_selection",
    "skpadim.persistence",
    "skpadim.tiling",
)


def _public_names():
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            yield module_name, name


PUBLIC_NAMES = sorted(set(_public_names()))


# ---------------------------------------------------------------------------
# doc/api.rst
# ---------------------------------------------------------------------------

_MODULE_DIRECTIVE = re.compile(r"^\.\. (?:py:)?(?:current)?module:: *([\w.]+)\s*$")
_AUTOMODULE = re.compile(r"^\.\. automodule:: *([\w.]+)\s*$")


def _autosummary_entries(text):
    """Fully qualified names listed by the autosummary directives of ``text``."""
    entries = []
    module = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        match = _MODULE_DIRECTIVE.match(line) or _AUTOMODULE.match(line)
        if match:
            module = match.group(1)
        if line.startswith(".. autosummary::"):
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                item = lines[i].strip()
                if item and not item.startswith(":"):
                    entries.append((module, item.lstrip("~")))
                i += 1
            continue
        i += 1
    return entries


def _resolve(module, name):
    """The object an autosummary entry names, relative to ``module`` or absolute."""
    candidates = [f"{module}.{name}"] if module else []
    candidates.append(name)
    for full in candidates:
        parts = full.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                break
            return full, obj
    return None, None


def _documented():
    entries = _autosummary_entries(API_RST.read_text(encoding="utf-8"))
    resolved = [_resolve(module, name) for module, name in entries]
    unresolved = [name for (module, name), (full, _) in zip(entries, resolved) if full is None]
    assert not unresolved, f"doc/api.rst lists names that do not exist: {unresolved}"
    return resolved


def _is_api_object(obj):
    """Classes, functions and other callables such as scorer objects."""
    return inspect.isclass(obj) or inspect.isroutine(obj) or callable(obj)


@pytest.mark.parametrize("module_name, name", PUBLIC_NAMES)
def test_public_name_is_in_the_api_reference(module_name, name):
    obj = getattr(importlib.import_module(module_name), name)
    documented = _documented()
    full = f"{module_name}.{name}"
    if any(doc_name == full for doc_name, _ in documented):
        return
    if _is_api_object(obj):
        # The same class or function may be documented under a shorter path
        # (skpadim.save for skpadim.persistence.save).
        assert any(doc_obj is obj for _, doc_obj in documented), (
            f"{full} is public but not listed in an autosummary of doc/api.rst"
        )
    else:
        # Plain values (a version string, a format number) may be described in prose.
        assert f"``{full}``" in API_RST.read_text(encoding="utf-8"), (
            f"{full} is public but neither listed nor mentioned in doc/api.rst"
        )


# ---------------------------------------------------------------------------
# Docstring sections
# ---------------------------------------------------------------------------


class _Sections:
    """Numpydoc sections of a docstring: which are present, and parameter names."""

    def __init__(self, doc):
        self.doc = inspect.cleandoc(doc or "")
        try:
            from numpydoc.docscrape import NumpyDocString
        except ImportError:
            self._sections = self._parse_headers(self.doc)
        else:
            parsed = NumpyDocString(self.doc)
            self._sections = {
                key: [p.name for p in value] if key in _PARAM_SECTIONS else value
                for key, value in parsed._parsed_data.items()
                if value
            }

    @staticmethod
    def _parse_headers(doc):
        """Minimal numpydoc parsing: 'Header' over a line of dashes starts a section."""
        lines = doc.splitlines()
        sections, current = {}, None
        for k, line in enumerate(lines):
            if k + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[k + 1].strip()) and line.strip():
                current = line.strip()
                sections[current] = []
                continue
            if current is None or re.fullmatch(r"-{3,}", line.strip()):
                continue
            if current in _PARAM_SECTIONS:
                if line and not line[0].isspace():  # a "name : type" line, not indented
                    sections[current].append(line.split(" : ")[0].strip())
            elif line.strip():
                sections[current].append(line)
        return {key: value for key, value in sections.items() if value}

    def has(self, section):
        return bool(self._sections.get(section))

    def names(self, section):
        """Documented names, "a, b" and "*args" split into ("a", "b") and "args"."""
        names = []
        for entry in self._sections.get(section, []):
            names += [n.strip().lstrip("*") for n in entry.split(",") if n.strip()]
        return names


_PARAM_SECTIONS = ("Parameters", "Returns", "Yields", "Attributes", "Other Parameters", "Raises")


def _package_callable(obj):
    return (getattr(obj, "__module__", None) or "").split(".")[0] == "skpadim"


def _public_objects():
    """Public classes and functions, each once, under its first public name."""
    seen, objects = set(), []
    for module_name, name in PUBLIC_NAMES:
        obj = getattr(importlib.import_module(module_name), name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or id(obj) in seen:
            continue
        seen.add(id(obj))
        objects.append((f"{module_name}.{name}", obj))
    return objects


def _public_methods(cls):
    """Methods defined by cls itself (not inherited from scikit-learn or numpy)."""
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if inspect.isfunction(member):
            yield name, member


def _arguments(func, skip_first=False):
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return []
    if skip_first and params:
        params = params[1:]
    return [p.name for p in params]


def _returns_and_yields(func):
    """Whether func's own body returns a value, and whether it yields."""
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return False, False
    tree = ast.parse(source).body[0]
    returns = yields = False
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue  # nested scopes have their own returns
        if isinstance(node, ast.Return) and node.value is not None:
            if not (isinstance(node.value, ast.Constant) and node.value.value is None):
                returns = True
        if isinstance(node, (ast.Yield, ast.YieldFrom)):
            yields = True
        stack.extend(ast.iter_child_nodes(node))
    return returns, yields


def _is_estimator(cls):
    from sklearn.base import BaseEstimator

    return issubclass(cls, BaseEstimator) and callable(getattr(cls, "fit", None))


def _constructor(cls):
    """The package-defined __init__ or __new__ of cls, or None."""
    for name in ("__init__", "__new__"):
        for klass in cls.__mro__:
            if name in vars(klass):
                member = vars(klass)[name]
                if isinstance(member, staticmethod):
                    member = member.__func__
                if _package_callable(member):
                    return member
                break
    return None


def _problems(qualname, obj, *, is_method=False):
    """Missing numpydoc sections of one class, function or method."""
    problems = []
    doc = inspect.getdoc(obj)
    if not doc:
        return [f"{qualname}: no docstring"]
    sections = _Sections(doc)

    if inspect.isclass(obj):
        constructor = _constructor(obj)
        args = _arguments(constructor, skip_first=True) if constructor else []
        if _is_estimator(obj) and not sections.has("Attributes"):
            problems.append(f"{qualname}: estimator without an Attributes section")
    else:
        args = _arguments(obj, skip_first=is_method)
        returns, yields = _returns_and_yields(obj)
        if yields and not sections.has("Yields"):
            problems.append(f"{qualname}: yields but has no Yields section")
        if returns and not yields and not sections.has("Returns"):
            problems.append(f"{qualname}: returns a value but has no Returns section")

    if args:
        if not sections.has("Parameters"):
            problems.append(f"{qualname}: takes {args} but has no Parameters section")
        else:
            missing = [a for a in args if a not in sections.names("Parameters")]
            if missing:
                problems.append(f"{qualname}: parameters {missing} are not documented")
    if not is_method and not sections.has("Examples"):
        problems.append(f"{qualname}: no Examples section")
    return problems


@pytest.mark.parametrize(
    "qualname, obj", _public_objects(), ids=[name for name, _ in _public_objects()]
)
def test_public_docstring_sections(qualname, obj):
    problems = _problems(qualname, obj)
    if inspect.isclass(obj):
        for name, method in _public_methods(obj):
            problems += _problems(f"{qualname}.{name}", method, is_method=True)
    assert not problems, "Docstring problems:\n" + "\n".join(problems)


def test_section_parsing_without_numpydoc():
    """The fallback parser reads the sections that numpydoc would."""
    doc = """Summary.

    Parameters
    ----------
    a, b : int
        Numbers.
    **kwargs : dict
        More.

    Returns
    -------
    total : int

    Examples
    --------
    >>> 1
    1
    """
    sections = _Sections._parse_headers(inspect.cleandoc(doc))
    assert sections["Parameters"] == ["a, b", "**kwargs"]
    assert sections["Returns"] == ["total"]
    assert "Examples" in sections and "Attributes" not in sections


# ---------------------------------------------------------------------------
# README.rst and the getting-started page
# ---------------------------------------------------------------------------


def _indented_blocks(text, opener):
    """The indented blocks of ``text`` that follow a line matching ``opener``, dedented."""
    lines, blocks = text.splitlines(), []
    for i, line in enumerate(lines):
        if not re.search(opener, line):
            continue
        body = []
        for following in lines[i + 1 :]:
            if following.strip() and not following.startswith((" ", "\t")):
                break
            body.append(following)
        blocks.append(textwrap.dedent("\n".join(body)).strip())
    return blocks


def test_the_readme_example_runs_as_written(capsys):
    # The first code users copy: a changed name or signature must fail here.
    text = (ROOT / "README.rst").read_text(encoding="utf-8")
    (example,) = _indented_blocks(text, r"^\.\. code-block:: python\s*$")
    namespace = {}
    exec(compile(example, "README.rst", "exec"), namespace)
    n_test = len(namespace["data"].X_test)
    assert namespace["scores"].shape == (n_test,)
    assert len(namespace["maps"]) == n_test
    assert len(capsys.readouterr().out.splitlines()) >= 2


def test_the_readme_paper_recipe_is_a_valid_detector():
    from sklearn.base import clone

    import skpadim

    text = (ROOT / "README.rst").read_text(encoding="utf-8")
    (recipe,) = _indented_blocks(text, r"paper's own recipe is a choice of parameters::\s*$")
    det = eval(recipe, {"PatchGaussianDetector": skpadim.PatchGaussianDetector,
                        "TorchvisionExtractor": skpadim.TorchvisionExtractor})  # fmt: skip
    det._validate_params()
    params = clone(det).get_params()
    assert (params["n_features"], params["shrinkage"], params["pooling"]) == (100, 0.01, 1)
    assert params["feature_extractor__backbone"] == "resnet18"


def test_the_getting_started_page_runs_as_written(tmp_path, monkeypatch):
    # Its code blocks are one session: run in order, in one namespace (the model
    # file it saves goes to a temporary folder).
    text = (ROOT / "doc" / "getting_started.rst").read_text(encoding="utf-8")
    blocks = _indented_blocks(text, r"^\.\. code-block:: python\s*$")
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"getting_started.rst, block {i + 1}", "exec"), namespace)
    assert namespace["det"].offset_ == pytest.approx(
        np.percentile(namespace["det"].score_samples(namespace["X_good_held_out"]), 1))
    assert (tmp_path / "brick.npz").is_file()
