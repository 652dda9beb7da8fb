"""docs/architecture.md's module list, enforced: every import inside src/duquant (at module level or inside a
function) points to a module listed above the importer (or to its own package), models/ imports nothing of
the quantization core, nothing imports cli, and every module is in the list."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "duquant"


def architecture_order() -> list[str]:
    """Entries of the module list in docs/architecture.md, top to bottom: 'config', 'kernels', ..."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("src/duquant/\n", 1)[1].split("```", 1)[0]
    names = [m.group(1) for m in re.finditer(r"^  (\w+)(?:\.py|/)\s", block, flags=re.M)]
    assert len(names) >= 10, f"could not read the module list of docs/architecture.md: {names}"
    return names


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def entry(module: str) -> str | None:
    """'duquant.serve.policy' -> 'serve'; the package itself -> None (the public surface, exempt)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported duquant module, line) for every import statement in the file, lazy ones included."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            for a in node.names:  # `from duquant import kernels` imports a module, not an attribute
                sub = f"{target}.{a.name}"
                if (SRC.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                        (SRC.parent / Path(*sub.split("."))).is_dir():
                    found.append((sub, node.lineno))
    return [(t, line) for t, line in found if t == "duquant" or t.startswith("duquant.")]


def source_files() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_is_in_the_architecture_list():
    listed = set(architecture_order())
    missing = sorted({module_name(p) for p in source_files() if entry(module_name(p)) not in listed | {None}})
    assert not missing, (f"{missing} are not in docs/architecture.md's module list; add each where its imports "
                         "put it (below everything it imports)")


def test_imports_only_point_downwards():
    order = architecture_order()
    rank = {name: i for i, name in enumerate(order)}
    bad = []
    for path in source_files():
        me = module_name(path)
        mine = entry(me)
        if mine is None or mine not in rank:
            continue
        for target, line in imports(path):
            theirs = entry(target)
            if theirs is None or theirs == mine:
                continue
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if theirs not in rank:
                bad.append(f"{where} (not in the list)")
            elif rank[theirs] > rank[mine]:
                bad.append(f"{where} ({theirs} is listed below {mine})")
            elif mine == "models":
                bad.append(f"{where} (models/ imports only torch, never the quantization core)")
    assert not bad, "imports against docs/architecture.md's order:\n" + "\n".join(bad)


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function and a relative one are both found."""
    fake = SRC / "serve" / "policy.py"
    found = {t for t, _ in imports(fake)}
    assert {"duquant.api", "duquant.workflows", "duquant.serve.wire"} <= found  # api / workflows are lazy
    order = architecture_order()
    assert order.index("config") < order.index("api") and order[-1] == "cli"
