"""The layers import one another in one direction only, read from the source with `ast`.

    sbx (client SDK, `sbx`)      talks HTTP: neither the service nor the sandbox
    service (REST API)           the public face of `sandbox` only (`from sandbox import X`)
    sandbox                      never service, sbx, testbed, loadtest or tests
      sandbox.runtime            never the middle layer (sandbox.engine, sandbox.images)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import sandbox

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"sandbox", "service", "sbx", "testbed", "loadtest", "tests", "policies"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """(line, module, name) for each first-party import, at any depth (lazy ones too):
    name is what `from module import name` takes, when it is not a module itself."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if _is_module(full):
                    yield node.lineno, full, None
                else:
                    yield node.lineno, base, alias.name


def _violations(package: str, allowed: str) -> list[str]:
    """Every import in `package` whose verdict from `_verdict` is not None."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module, name in _imports(path):
            if module.split(".")[0] not in FIRST_PARTY:
                continue
            why = _verdict(allowed, _module_name(path), module, name)
            if why:
                target = f"{module}.{name}" if name else module
                found.append(f"{path.relative_to(ROOT)}:{line}: {target}: {why}")
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _verdict(rule: str, importer: str, module: str, name: str | None) -> str | None:
    top = module.split(".")[0]
    if rule == "service":
        if top == "service":
            return None
        if module == "sandbox" and name in sandbox.__all__:
            return None
        return "service/ imports only `from sandbox import <a name in sandbox.__all__>`"
    if rule == "sbx":
        if top in ("service", "sandbox", "testbed"):
            return "the client talks to the service over HTTP, never imports its code"
        return None
    if rule == "sandbox":
        if top != "sandbox":
            return "sandbox/ never imports the layers above it nor test fixtures"
        if module == "sandbox" and name is not None and importer != "sandbox":
            return ("inside sandbox/, import from the module that defines it: the public "
                    "face loads the whole engine")
        if _within(importer, "sandbox.runtime") and (
                _within(module, "sandbox.engine") or _within(module, "sandbox.images")):
            return "the runtime never imports the engine or the images layer above it"
        return None
    raise AssertionError(rule)


@pytest.mark.parametrize("package", ["service", "sbx", "sandbox"])
def test_layers_import_downwards_only(package: str) -> None:
    assert (ROOT / package).is_dir(), f"{package}/ is missing"
    assert _violations(package, package) == []


def test_public_face_names_load_and_type_checkers_see_them_where_they_load() -> None:
    tree = ast.parse((ROOT / "sandbox/__init__.py").read_text())
    checked = {alias.asname or alias.name: stmt.module + (
                   f":{alias.name}" if alias.asname not in (None, alias.name) else "")
               for node in ast.walk(tree)
               if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
               for stmt in node.body if isinstance(stmt, ast.ImportFrom) and stmt.module
               for alias in stmt.names}
    assert checked == sandbox._HOMES
    assert sorted(checked) == sandbox.__all__
    for name in sandbox.__all__:
        assert getattr(sandbox, name) is not None
