"""`lora_trainer ui` on a gradio stack known not to serve its page: one line naming the install that works,
and that install (the `ui` extra, the README line) keeps every known-broken companion out."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from lora_trainer.cli import main
from lora_trainer.ui import stack
from lora_trainer.ui.stack import INSTALL_LINE, KNOWN_BROKEN, stack_problem, version_tuple

ROOT = Path(__file__).resolve().parent.parent

# what a plain `pip install "gradio>=3.41,<5"` resolved to, and what the `ui` extra resolves to
RESOLVED_PLAIN = {"gradio": "4.44.1", "pydantic": "2.14.4", "starlette": "1.10.0", "huggingface_hub": "0.36.2"}
RESOLVED_EXTRA = {"gradio": "4.44.1", "pydantic": "2.10.6", "starlette": "0.52.1", "huggingface_hub": "0.36.2"}
FORGE = {"gradio": "4.40.0", "pydantic": "2.8.2", "starlette": "0.27.0", "huggingface_hub": "0.36.2"}
A1111 = {"gradio": "3.41.2", "pydantic": "1.10.27", "starlette": "0.26.1", "huggingface_hub": "0.36.2"}


def test_version_tuple():
    assert version_tuple("2.11.0rc1") == (2, 11, 0)
    assert version_tuple("1.0") >= (1,)
    assert version_tuple("0.52.1") < (1,)
    assert version_tuple("2.10.6") < (2, 11) <= version_tuple("2.11")


@pytest.mark.parametrize("versions", [RESOLVED_EXTRA, FORGE, A1111, {}, {"pydantic": "2.14.4"}],
                         ids=["ui-extra", "forge", "a1111", "nothing", "no-gradio"])
def test_working_stacks_pass(versions):
    assert stack_problem(versions) is None


@pytest.mark.parametrize(("package", "version"), [("pydantic", "2.11.0"), ("starlette", "1.0.0"),
                                                  ("huggingface_hub", "1.0.0")])
def test_each_known_breakage_is_refused_with_the_install_line(package, version):
    problem = stack_problem({**FORGE, package: version})
    assert problem is not None and "\n" not in problem
    assert f"{package} {version}" in problem and "gradio 4.40.0" in problem
    assert problem.endswith(INSTALL_LINE)
    # the version just below the breaking one is fine
    below = {"pydantic": "2.10.6", "starlette": "0.52.1", "huggingface_hub": "0.36.2"}[package]
    assert stack_problem({**FORGE, package: below}) is None


def test_what_plain_gradio_resolved_to_is_refused():
    assert "pydantic 2.14.4" in stack_problem(RESOLVED_PLAIN)


def test_cli_ui_stops_with_one_line_before_importing_gradio(monkeypatch, capsys):
    monkeypatch.setattr(stack, "installed_versions", lambda names=stack.STACK: dict(RESOLVED_PLAIN))
    monkeypatch.setitem(sys.modules, "gradio", None)  # importing gradio would raise: the check must come first
    assert main(["ui", "--set", "pretrained_model=builtin:tiny-sd15"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pydantic 2.14.4" in err[0] and err[0].endswith(INSTALL_LINE)


def test_cli_ui_without_gradio_names_the_extra(monkeypatch, capsys):
    monkeypatch.setattr(stack, "installed_versions", lambda names=stack.STACK: {})
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if gradio were not installed
    assert main(["ui", "--set", "pretrained_model=builtin:tiny-sd15"]) == 2
    err = capsys.readouterr().err
    assert "needs the package 'gradio'" in err and '".[standalone,ui]"' in err


def _ui_extra() -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ui"]


def test_ui_extra_excludes_every_known_breakage():
    """Each (package, first broken version) has an upper bound in the extra at or below that version."""
    bounds = {}
    for req in _ui_extra():
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(.*)", req.replace(" ", ""))
        for spec in m.group(2).split(","):
            if spec.startswith("<") and not spec.startswith("<="):
                bounds[m.group(1).lower().replace("-", "_")] = version_tuple(spec[1:])
    assert bounds["gradio"] == (5,), "the tab is tested on gradio 4 (and 3.41 under A1111's pins), not 5"
    for major, package, first_broken, _ in KNOWN_BROKEN:
        assert major == 4
        assert package in bounds and bounds[package] <= first_broken, f"the ui extra lets {package} {first_broken} in"


def test_readme_states_the_install_line():
    text = (ROOT / "README.md").read_text()
    section = re.split(r"\n##+ ", text.split("### The training tab, standalone", 1)[1])[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    installs = [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("pip install")]
    assert installs[0].startswith("pip install torch"), "torch first: a bare torch requirement pulls the CUDA build"
    assert INSTALL_LINE in installs
