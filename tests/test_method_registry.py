"""Methods are registered once (``rayprune.methods.MODULES``), a method's module loads only when it
is asked for, and no module of the package is named like a standard-library module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import rayprune
from rayprune.methods import MODULES, Method, get_method, register

PACKAGE = Path(rayprune.__file__).parent


@pytest.mark.parametrize("name", list(MODULES))
def test_a_shipped_method_is_the_class_of_its_module_that_declares_its_name(name):
    cls = get_method(name)
    assert cls.name == name
    assert cls.__module__ == f"rayprune.methods.{MODULES[name]}"


@pytest.mark.slow  # a fresh interpreter importing torch
def test_a_method_module_is_imported_only_when_the_method_is_asked_for():
    code = (
        "import sys\n"
        "from rayprune.methods import MODULES, get_method\n"
        "def loaded():\n"
        "    return sorted(m for m in MODULES.values() if f'rayprune.methods.{m}' in sys.modules)\n"
        "print(loaded())\n"
        "get_method('random')\n"
        "print(loaded())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "['random_search']"]


def test_a_module_without_the_declared_class_is_refused(monkeypatch):
    monkeypatch.setitem(MODULES, "nameless", "finetune")
    with pytest.raises(TypeError, match=r"rayprune\.methods\.finetune must define one Method subclass"):
        get_method("nameless")


def test_a_method_from_outside_cannot_take_a_shipped_name():
    class Mine(Method):
        pass

    with pytest.raises(ValueError, match="'ast' is one of rayprune's own"):
        register("ast")(Mine)
    assert get_method("ast") is not Mine


def test_no_module_is_named_like_a_standard_library_module():
    shadowing = {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if (p.parent.name if p.stem == "__init__" else p.stem) in sys.stdlib_module_names
    }
    assert shadowing == set()
