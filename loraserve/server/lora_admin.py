"""Adapters managed over HTTP while serving: vLLM's load / unload endpoints and the adapters API.

Loading is off unless the operator switches it on (--allow-runtime-lora, or vLLM's env variable),
and a client may name only directories under the operator's --lora-root directories: the server
reads whatever directory it is pointed at, so an unconfined path would let any key holder make it
read (and report on) files anywhere on the machine.
"""

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import PurePath

from loraserve.engine.async_engine import EngineDeadError
from loraserve.engine.llm_engine import LoRANotEnabled, UnknownModelError
from loraserve.lora.adapter import AdapterError
from loraserve.lora.manager import AdapterConflict
from loraserve.lora.manager import AdapterNotFound as ManagerAdapterNotFound
from loraserve.server.errors import (
    AdapterNameConflict,
    AdapterNotFound,
    AdapterRefused,
    EngineUnavailable,
    InvalidValue,
    LoRAPathForbidden,
    RuntimeLoRADisabled,
)
from loraserve.server.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def runtime_lora_from_env() -> bool:
    """vLLM's switch for the load / unload endpoints, honoured so a vLLM launch moves over unchanged."""
    return os.environ.get(RUNTIME_LORA_ENV, "").strip().lower() in ("1", "true")


def resolve_lora_path(path: str, roots: Sequence[str]) -> str:
    """The real directory a requested `lora_path` names, or LoRAPathForbidden. Relative paths are
    taken inside the roots (the first root where the path exists); symlinks are followed and the
    result must still lie inside a root."""
    if not roots:
        raise LoRAPathForbidden("this server allows no adapter directories: start it with --lora-root DIR "
                                "(repeatable) to name the directories runtime loads may read", param="lora_path")
    if "\x00" in path:
        raise InvalidValue("lora_path contains a NUL byte", param="lora_path")
    if ".." in PurePath(path).parts:
        raise LoRAPathForbidden(f"lora_path {path!r} contains '..'; name a directory inside the allowed "
                                f"roots ({', '.join(roots)})", param="lora_path")
    real_roots = [os.path.realpath(root) for root in roots]
    if os.path.isabs(path):
        real = os.path.realpath(path)
    else:
        candidates = [os.path.join(root, path) for root in real_roots]
        real = os.path.realpath(next((c for c in candidates if os.path.exists(c)), candidates[0]))
    if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in real_roots):
        raise LoRAPathForbidden(f"lora_path {path!r} is outside the allowed adapter directories "
                                f"({', '.join(roots)}); symlinks are followed and must stay inside them",
                                param="lora_path")
    return real


class LoRAAdmin:
    """The handlers behind the adapter endpoints, turning engine errors into client errors."""

    def __init__(self, engine, allow_runtime_lora: bool, lora_roots: Sequence[str]):
        self.engine = engine
        self.allow_runtime_lora = allow_runtime_lora
        self.lora_roots = list(lora_roots)

    def _check_enabled(self) -> None:
        if not self.allow_runtime_lora:
            raise RuntimeLoRADisabled(
                "Loading and unloading adapters at runtime is disabled on this server: start it with "
                f"--allow-runtime-lora (or {RUNTIME_LORA_ENV}=true) and --lora-root DIR")

    async def load(self, req: LoadLoRAAdapterRequest) -> dict:
        self._check_enabled()
        path = resolve_lora_path(req.lora_path, self.lora_roots)
        try:
            report, created = await self.engine.load_lora_adapter(req.lora_name, path)
        except LoRANotEnabled as err:
            raise RuntimeLoRADisabled(str(err)) from None
        except AdapterConflict as err:
            raise AdapterNameConflict(str(err), param="lora_name") from None
        except AdapterError as err:
            raise AdapterRefused(str(err), param="lora_path") from None
        except EngineDeadError as err:
            raise EngineUnavailable(str(err)) from None
        verb = "added" if created else "was already loaded from this path; nothing changed"
        return {"message": f"Success: LoRA adapter '{req.lora_name}' {verb}.", "created": created,
                "adapter": asdict(report)}

    async def unload(self, req: UnloadLoRAAdapterRequest) -> dict:
        self._check_enabled()
        try:
            in_flight = await self.engine.unload_lora_adapter(req.lora_name)
        except LoRANotEnabled as err:
            raise RuntimeLoRADisabled(str(err)) from None
        except ManagerAdapterNotFound as err:
            raise AdapterNotFound(str(err), param="lora_name") from None
        except EngineDeadError as err:
            raise EngineUnavailable(str(err)) from None
        return {"message": f"Success: LoRA adapter '{req.lora_name}' removed.", "requests_in_flight": in_flight}

    async def status(self, name: str | None = None) -> list[dict]:
        """Load reports and tiers; with LoRA off there are simply no adapters to list."""
        if self.engine.engine.lora is None and name is None:
            return []
        try:
            return await self.engine.lora_status(name)
        except (UnknownModelError, LoRANotEnabled) as err:
            raise AdapterNotFound(str(err)) from None
        except EngineDeadError as err:
            raise EngineUnavailable(str(err)) from None
