"""The gradio stack ``lora_trainer ui`` runs on: known-broken version combinations, found before gradio starts.

A plain ``pip install "gradio<5"`` resolves today to gradio 4.44 with companions released after it
(pydantic 2.11+, starlette 1.x, huggingface_hub 1.x); gradio 4 then starts but its page never loads.
Rather than a page that never loads, ``lora_trainer ui`` stops with one line naming the install that
works: the ``ui`` extra (pyproject.toml), whose bounds are the same facts as :data:`KNOWN_BROKEN`.
Inside the WebUIs none of this runs: their gradio stack is the host's.
"""

from __future__ import annotations

import re
from importlib import metadata

# what the README's standalone tab section says, run in the lora_trainer folder
INSTALL_LINE = 'pip install -e ".[standalone,ui]"'

# (gradio major version, companion package, first broken version, what goes wrong)
KNOWN_BROKEN: list[tuple[int, str, tuple[int, ...], str]] = [
    (4, "pydantic", (2, 11), "gradio_client 1.3 cannot read its JSON schemas "
     "(TypeError: argument of type 'bool' is not iterable), so the page never loads"),
    (4, "starlette", (1,), "it removed TemplateResponse(name, context), which gradio 4 serves its page with"),
    (4, "huggingface_hub", (1,), "it removed HfFolder, which gradio 4 imports"),
]

STACK = ("gradio", "pydantic", "starlette", "huggingface_hub")


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.11.0rc1"`` -> ``(2, 11, 0)``: the leading release numbers only."""
    release = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(p) for p in release.group(0).split(".")) if release else ()


def installed_versions(names=STACK) -> dict[str, str]:
    """Versions of the installed distributions among ``names`` (the missing ones are left out)."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def stack_problem(versions: dict[str, str]) -> str | None:
    """One line saying why this gradio stack cannot serve the tab and what to install, or None."""
    gradio = versions.get("gradio")
    if not gradio:
        return None
    major = version_tuple(gradio)[:1]
    for gradio_major, package, first_broken, why in KNOWN_BROKEN:
        have = versions.get(package)
        if major == (gradio_major,) and have and version_tuple(have) >= first_broken:
            return (
                f"gradio {gradio} does not work with {package} {have}: {why}. "
                f"Install the versions the tab works with, in the lora_trainer folder: {INSTALL_LINE}"
            )
    return None


def check_stack(versions: dict[str, str] | None = None) -> None:
    """Raise :class:`~lora_trainer.errors.LoraTrainerError` when the installed stack is known to be broken."""
    problem = stack_problem(installed_versions() if versions is None else versions)
    if problem:
        from ..errors import LoraTrainerError

        raise LoraTrainerError(problem)
