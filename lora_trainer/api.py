"""REST routes: drive training without the browser (start, status, stop, stop-and-save, grid).

Mounted by the WebUI hosts in ``on_app_started`` and by the standalone page. Plain
``Request`` bodies (no pydantic models) so the same code runs on the FastAPI/pydantic pairs
A1111 (0.94/1.x) and Forge (0.104/2.x) ship.
"""

# no ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations
# (``request: Request``) at runtime, and ``Request`` is imported inside add_routes.
import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import TrainConfig
from .errors import ConfigError, LoraTrainerError
from .job import JobBusy, JobStatus

PREFIX = "/lora_trainer/v1"
MAX_BODY_BYTES = 1 << 20
"""The largest request body read: every option together is a few KiB; a bigger body is a mistake or an
attack, and is refused (413) before it is held in memory or reaches validation."""


class BodyTooLarge(Exception):
    pass


async def read_body(request: Any, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, read no further than ``limit`` bytes: a declared length over it is refused before
    reading, and a body without one (chunked) is cut off once it passes it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def parse_credentials(api_auth: str | None) -> dict[str, str]:
    """``user:pass,user2:pass2`` as the hosts' ``--api-auth`` takes it."""
    creds: dict[str, str] = {}
    for pair in (api_auth or "").split(","):
        if ":" in pair:
            user, pw = pair.strip().split(":", 1)
            creds[user] = pw
    return creds


def check_output_inside(folder: Path, output_name: str) -> Path:
    """The final file path, refusing any name that would place a file outside ``folder``."""
    folder = folder.resolve()
    target = (folder / f"{output_name}.safetensors").resolve()
    if target.parent != folder:
        raise ConfigError("output_name", output_name, f"a plain file name; files must stay inside {folder}")
    return target


def cross_site_reason(headers: Any) -> str | None:
    """Why a request comes from another site's web page, or None.

    Browsers send ``Origin`` with every cross-site POST and every ``fetch``; a page the user happens to
    visit must not start or stop a training on their machine. Requests without ``Origin`` (curl, scripts,
    the WebUI's own server-side calls) are not made by a web page. ``Origin: null`` (sandboxed frames,
    local files) is refused too."""
    origin = headers.get("origin")
    if origin is None:
        return None
    if urlsplit(origin).netloc.lower() != headers.get("host", "").lower():
        return f"requests from another site ({origin}) are refused; call the routes from this page, curl or a script"
    return None


def is_json(headers: Any) -> bool:
    """A JSON body, by its declared type: a web page can send text/plain or a form to another site
    without the browser asking first, but not application/json."""
    return headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"


def add_routes(
    app: Any,
    start: Callable[[TrainConfig], None],
    stop: Callable[[bool], bool],
    status: Callable[[], JobStatus],
    defaults: Callable[[], TrainConfig],
    lora_dir: Callable[[TrainConfig], Path],
    credentials: dict[str, str] | None = None,
    fixed_fields: dict[str, Any] | None = None,
    start_grid: Callable[[TrainConfig, list[str]], None] | None = None,
) -> None:
    """Register the routes on a FastAPI ``app``. ``fixed_fields`` are set by the host and cannot be
    overridden by a request (e.g. the output folder inside a WebUI)."""
    from fastapi import Depends, HTTPException, Request
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    def same_site(request: Request) -> None:
        reason = cross_site_reason(request.headers)
        if reason:
            raise HTTPException(status_code=403, detail=reason)

    dependencies = [Depends(same_site)]
    if credentials:
        basic = HTTPBasic()

        def auth(cred: HTTPBasicCredentials = Depends(basic)) -> None:  # noqa: B008 - FastAPI idiom
            expected = credentials.get(cred.username)
            if expected is None or not secrets.compare_digest(cred.password, expected):
                raise HTTPException(status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

        dependencies.append(Depends(auth))

    def error(code: int, e: Exception) -> JSONResponse:
        body: dict[str, Any] = {"error": str(e)}
        if isinstance(e, ConfigError):
            body.update(field=e.field, value=str(e.value), allowed=e.allowed)
        return JSONResponse(status_code=code, content=body)

    def not_json() -> JSONResponse:
        return JSONResponse(status_code=415, content={"error": "send the body as JSON (content-type: application/json)"})

    def too_large() -> JSONResponse:
        return JSONResponse(status_code=413, content={"error": f"the body is larger than {MAX_BODY_BYTES} bytes; send only the options"})

    async def train_route(request: Request):
        if not is_json(request.headers):
            return not_json()
        try:
            payload = json.loads(await read_body(request))
        except BodyTooLarge:
            return too_large()
        except Exception:  # noqa: BLE001 - any unreadable body is the same error to the caller
            payload = None
        if not isinstance(payload, dict):
            return JSONResponse(status_code=400, content={"error": "send the options as a JSON object"})
        try:
            data = {**defaults().to_dict(), **payload, **(fixed_fields or {})}
            if isinstance(data.get("resume"), bool):  # {"resume": true}: the latest state of output_name
                data["resume"] = "latest" if data["resume"] else ""
            if data.get("resume") not in ("", "latest"):  # a path would let a request read any file of the server
                raise ConfigError("resume", data["resume"], "true, false, \"latest\" or \"\" over REST (a state of this output_name)")
            cfg = TrainConfig.from_dict(data, source="the request").validate()
            check_output_inside(lora_dir(cfg), cfg.output_name)
            start(cfg)
        except JobBusy as e:
            return error(409, e)
        except ConfigError as e:
            return error(422, e)
        except LoraTrainerError as e:
            return error(400, e)
        return {"started": True, "output_name": cfg.output_name, "status": status().as_dict()}

    async def grid_route(request: Request):
        """``{"files": ["name-000003.safetensors", ...], "grid_weights": "0, 0.5, 1", ...}``: a grid of
        saved files of the LoRA folder (names relative to it), as the tab's "Build grid" button."""
        if not is_json(request.headers):
            return not_json()
        try:
            payload = json.loads(await read_body(request))
        except BodyTooLarge:
            return too_large()
        except Exception:  # noqa: BLE001 - any unreadable body is the same error to the caller
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("files"), list) or not payload["files"]:
            return JSONResponse(status_code=400, content={"error": 'send {"files": ["<name>.safetensors", ...]} and grid options'})
        names = [str(n) for n in payload.pop("files")]
        try:
            cfg = TrainConfig.from_dict({**defaults().to_dict(), **payload, **(fixed_fields or {})}, source="the request").validate()
            folder = lora_dir(cfg).resolve()
            paths = []
            for n in names:
                target = (folder / n).resolve()
                if folder not in target.parents or target.suffix != ".safetensors":
                    raise ConfigError("files", n, f"a .safetensors file inside {folder}, named relative to it")
                paths.append(str(target))
            start_grid(cfg, paths)
        except JobBusy as e:
            return error(409, e)
        except ConfigError as e:
            return error(422, e)
        except LoraTrainerError as e:
            return error(400, e)
        return {"started": True, "files": paths, "status": status().as_dict()}

    async def status_route():
        return status().as_dict()

    async def stop_route(request: Request):
        save = False
        try:
            body = json.loads(await read_body(request))
            save = bool(isinstance(body, dict) and body.get("save"))
        except BodyTooLarge:
            return too_large()
        except Exception:  # noqa: BLE001 - an empty body means a plain stop
            pass
        return {"stopping": stop(save), "save": save}

    async def stop_save_route():
        return {"stopping": stop(True), "save": True}

    app.add_api_route(f"{PREFIX}/train", train_route, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/status", status_route, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/stop", stop_route, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/stop_and_save", stop_save_route, methods=["POST"], dependencies=dependencies)
    if start_grid is not None:
        app.add_api_route(f"{PREFIX}/grid", grid_route, methods=["POST"], dependencies=dependencies)
