"""Imports run one way (DESIGN.md): read every module's imports, function-local ones included, and fail on any that
reaches a layer above it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dsjax"

JOBS = ("dsjax.train", "dsjax.generate", "dsjax.eval", "dsjax.main", "dsjax.convert", "dsjax.chat")
# module prefix -> the prefixes it must never import (longest prefix wins).
FORBIDDEN = {
    "dsjax.errors": ("dsjax.",),
    "dsjax.sharding": tuple(p for p in ("dsjax.model", "dsjax.data", "dsjax.kernels", "dsjax.config",
                                        "dsjax.checkpoint", "dsjax.interop") + JOBS),
    "dsjax.kernels": ("dsjax.model", "dsjax.data", "dsjax.config", "dsjax.checkpoint", "dsjax.interop") + JOBS,
    "dsjax.model": ("dsjax.data", "dsjax.config", "dsjax.checkpoint", "dsjax.interop", "dsjax.scaling") + JOBS,
    "dsjax.data": ("dsjax.model", "dsjax.kernels", "dsjax.config", "dsjax.checkpoint", "dsjax.interop",
                   "dsjax.sharding") + JOBS,
    "dsjax.interop": ("dsjax.config", "dsjax.checkpoint") + JOBS,
    "dsjax.config": ("dsjax.checkpoint", "dsjax.interop", "dsjax.data") + JOBS,
    "dsjax.scaling": ("dsjax.checkpoint", "dsjax.interop", "dsjax.data") + JOBS,
    "dsjax.checkpoint": ("dsjax.config",) + JOBS,
    "dsjax.distributed": ("dsjax.model", "dsjax.data", "dsjax.kernels", "dsjax.config", "dsjax.checkpoint",
                          "dsjax.interop", "dsjax.sharding") + JOBS,
    # generation and evaluation serve checkpoints without the trainer; evaluation may generate.
    "dsjax.generate": ("dsjax.train", "dsjax.eval", "dsjax.main", "dsjax.convert", "dsjax.chat"),
    "dsjax.eval": ("dsjax.train", "dsjax.main", "dsjax.convert", "dsjax.chat"),
    "dsjax.chat": ("dsjax.train", "dsjax.eval", "dsjax.main", "dsjax.convert"),
    "dsjax.convert": ("dsjax.train", "dsjax.generate", "dsjax.eval", "dsjax.main", "dsjax.chat"),
    # the trainer may use anything below the CLIs, and its tasks may generate and evaluate.
    "dsjax.train": ("dsjax.main", "dsjax.convert", "dsjax.chat"),
    "dsjax.main": ("dsjax.convert", "dsjax.chat"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # `from dsjax import train`
    return found


def matches(name: str, prefix: str) -> bool:
    return prefix == "dsjax." and name.startswith(prefix) or name == prefix or name.startswith(prefix + ".")


def rule_for(module: str):
    best = max((p for p in FORBIDDEN if matches(module, p)), key=len, default=None)
    return FORBIDDEN.get(best, ())


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_rule():
    unruled = [module_name(p) for p in MODULES if module_name(p) != "dsjax" and not rule_for(module_name(p))]
    assert not unruled, f"add these to FORBIDDEN: {unruled}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_run_one_way(path):
    module = module_name(path)
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
           for line, name in imports_of(path) for prefix in rule_for(module)
           if matches(name, prefix) and not matches(name, module)]
    assert not bad, "; ".join(bad)


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    fake = PACKAGE / "model" / "attention.py"
    source = fake.read_text() + "\n\ndef _late():\n    from dsjax.train.trainer import train  # noqa\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    assert any(name.startswith("dsjax.train") for _, name in imports_of(fake))
    assert any(matches(n, p) for _, n in imports_of(fake) for p in rule_for("dsjax.model.attention"))
