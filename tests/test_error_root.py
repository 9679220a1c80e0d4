"""One error root (issue 19): every exception class rayprune defines derives from
:class:`~rayprune.errors.RaypruneError`; the command line prints a RaypruneError as one line
with exit status 2 and its own flags, anything else as the one "bug" line; core messages name no
command-line flag."""

from __future__ import annotations

import ast
import importlib
import inspect
import pickle
import pkgutil
import re
from pathlib import Path

import pytest

import rayprune
from rayprune import cli
from rayprune.errors import InputError, RaypruneError

PACKAGE = Path(rayprune.__file__).parent

#: Exception classes rayprune defines that are not meant for users (none so far): name -> why.
NOT_FOR_USERS: dict[str, str] = {}


def defined_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the package (module level or in a class)."""
    found: dict[str, type[BaseException]] = {}

    def collect(owner: object, module: str) -> None:
        for _, obj in inspect.getmembers(owner, inspect.isclass):
            if obj.__module__ != module or f"{module}.{obj.__qualname__}" in found:
                continue
            if issubclass(obj, BaseException):
                found[f"{module}.{obj.__qualname__}"] = obj
            collect(obj, module)

    for info in pkgutil.walk_packages(rayprune.__path__, "rayprune."):
        collect(importlib.import_module(info.name), info.name)
    return found


def test_every_exception_class_of_the_package_derives_from_the_root():
    found = defined_exceptions()
    assert {"rayprune.models.base.SpecError", "rayprune.tracking.TrackingError", "rayprune.cli.CliError"} <= set(found)
    assert len(found) >= 15  # the walk really reaches every layer
    strays = sorted(name for name, cls in found.items() if not issubclass(cls, RaypruneError))
    assert strays == sorted(NOT_FOR_USERS)


def test_an_error_keeps_its_fix_and_flag_keys_across_processes():
    """A Ray task's error reaches the driver pickled: the CLI still finds its option and hint."""
    err = InputError("out_dir 'x' is a file", fix="give a folder", option="out_dir", hint="fresh_start")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.problem, back.fix, back.option, back.hint) == (
        "out_dir 'x' is a file; give a folder",
        "out_dir 'x' is a file",
        "give a folder",
        "out_dir",
        "fresh_start",
    )
    assert isinstance(back, ValueError)


# ---------------------------------------------------------------------------------------------
# The command line's boundary
# ---------------------------------------------------------------------------------------------


def run_inspect_raising(monkeypatch, capsys, error: BaseException) -> tuple[int, str]:
    def command(args):
        raise error

    monkeypatch.setattr(cli, "cmd_inspect", command)
    monkeypatch.delenv("RAYPRUNE_DEBUG", raising=False)
    code = cli.main(["inspect", "x.json"])
    return code, capsys.readouterr().err


def test_a_rayprune_error_is_one_line_and_exit_2(monkeypatch, capsys):
    code, err = run_inspect_raising(monkeypatch, capsys, RaypruneError("the spec is odd\nsecond line"))
    assert (code, err) == (2, "rayprune: error: the spec is odd second line\n")


@pytest.mark.parametrize("error", [ValueError("bad value"), FileNotFoundError("nothing here"), KeyError("k")])
def test_any_other_error_is_the_bug_line_not_exit_2(monkeypatch, capsys, error):
    code, err = run_inspect_raising(monkeypatch, capsys, error)
    assert code == cli.EXIT_FAILED != 2
    assert err.startswith(f"rayprune: error: internal error, a bug in rayprune ({type(error).__name__}: ")
    assert err.endswith("rerun with RAYPRUNE_DEBUG=1 to see the traceback, and report it\n")
    monkeypatch.setenv("RAYPRUNE_DEBUG", "1")
    with pytest.raises(type(error)):
        cli.main(["inspect", "x.json"])


def test_the_command_line_words_the_fix_and_the_option_with_its_flags(monkeypatch, capsys):
    error = InputError(
        "out_dir 'o' holds a run with other settings (seed)",
        fix="resume with the same settings",
        option="out_dir",
        hint="other_settings",
    )
    assert str(error) == "out_dir 'o' holds a run with other settings (seed); resume with the same settings"

    def run(args):
        raise error

    monkeypatch.setattr(cli, "cmd_run", run)
    argv = ["run", "--method", "uniform", "--model", "cifar_resnet:tiny", "--flops-target", "0.5", "--out", "o"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (
        "rayprune: error: --out 'o' holds a run with other settings (seed); resume with the same settings, "
        "use another --out, or pass --no-resume\n"
    )
    assert cli.with_flags(error, "sweep") == str(error)  # a command without those flags: the plain line


def test_a_validation_error_names_the_flags_of_run():
    from rayprune.errors import validated
    from rayprune.runner import TrialConfig

    with pytest.raises(InputError) as caught:
        validated(TrialConfig, {"method": "uniform", "model": "cifar_resnet:tiny", "flops_target": 1.5})
    assert str(caught.value).startswith("flops_target: ")
    assert cli.one_line(caught.value, "run").startswith("--flops-target: ")


# ---------------------------------------------------------------------------------------------
# Core messages name no flag
# ---------------------------------------------------------------------------------------------

CORE = ["models", "engine", "methods", "testing", "runner.py", "registry.py", "errors.py", "grid.py", "export.py"]
FLAG = re.compile(r"(?<![\w-])--[a-z]")


def raised_texts(path: Path) -> list[str]:
    """The string pieces of every ``raise`` statement in ``path`` (f-string parts included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node.value
        for statement in ast.walk(tree)
        if isinstance(statement, ast.Raise)
        for node in ast.walk(statement)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_core_errors_name_no_command_line_flag():
    files = [p for name in CORE for p in ([PACKAGE / name] if name.endswith(".py") else (PACKAGE / name).rglob("*.py"))]
    flagged = {str(p.relative_to(PACKAGE)): t for p in files for t in raised_texts(p) if FLAG.search(t)}
    assert flagged == {}
    assert len(files) > 30  # the scan really covers the core
