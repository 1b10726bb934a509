"""``python -m mooncake.mooncake_store_service``: a store client behind a REST API.

The reference's service (``mooncake-wheel/mooncake/mooncake_store_service.py``,
CLI ``mc_store_rest_server``): one ``MooncakeDistributedStore`` that owns a
segment of the pool, configured from ``--config`` (JSON), else the
``MOONCAKE_*`` environment (:class:`~mooncake.mooncake_config.MooncakeConfig`),
overridden by ``-D key=value``; an aiohttp server on ``--port`` (8080):

=======  ===========================  ================================================
PUT      ``/api/put``                 ``{"key", "value"}`` (value stored UTF-8 encoded)
GET      ``/api/get/{key}``           the value (``application/octet-stream``); 404
GET      ``/api/exist/{key}``         ``{"exists": bool}``
DELETE   ``/api/remove/{key}``        ``{"status": "success"}``
DELETE   ``/api/remove_all``          ``{"status": "success removed N keys"}``
POST     ``/api/mount_shm``           ``{"name", "size", "offset", "protocol", "location"}``
POST     ``/api/unmount_shm``         ``{"segment_ids", "grace_period_seconds"}``
POST     ``/api/mount``               ``{"size", "protocol", "location"}`` (fresh memory)
POST     ``/api/unmount``             ``{"segment_ids", "grace_period_seconds"}``
POST     ``/api/unmount_local_disk``  ``{"grace_period_seconds"}`` (<= 3600)
POST     ``/api/reconfigure``         ``{"mode": "decode", "path", "size", ...}`` or ``{"mode": "prefill"}``
=======  ===========================  ================================================

Errors are ``{"error": "..."}`` with 400 (bad request) or 500 (the store
failed), as the reference.  ``/api/reconfigure`` switches a node between
*prefill* (no extra segment) and *decode* (a file-backed segment mounted):
a new decode mount is made before the previous segments are retired, and a
failed mount keeps them serving.  Needs aiohttp: ``pip install 'pymooncake[service]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .mooncake_config import MooncakeConfig
from .store import MooncakeDistributedStore

try:
    from aiohttp import web
except ImportError:  # pragma: no cover - exercised only without the extra
    web = None  # type: ignore[assignment]

__all__ = ["MooncakeStoreService", "main", "parse_arguments", "sync_main"]

log = logging.getLogger("mooncake.store_service")

#: the reference caps /api/unmount_local_disk's grace period at an hour
_MAX_UNMOUNT_LOCAL_DISK_GRACE_PERIOD_SECONDS = 3600
#: largest request body the API accepts (reference: 100 MB)
_MAX_BODY_BYTES = 100 * 1024 * 1024

Handler = Callable[[Any], Awaitable[Any]]


def _web() -> Any:
    if web is None:
        raise RuntimeError(
            "mooncake_store_service needs aiohttp, which is not installed: "
            "pip install 'pymooncake[service]'"
        )
    return web


def _json(status: int, body: dict[str, Any]) -> Any:
    return _web().Response(status=status, text=json.dumps(body), content_type="application/json")


def _error(status: int, message: str, **extra: Any) -> Any:
    return _json(status, {"error": message, **extra})


def _timed_handler(operation: str, handler: Handler) -> Handler:
    """Log how long each request of ``operation`` took."""

    async def wrapper(request: Any) -> Any:
        start = time.perf_counter()
        try:
            return await handler(request)
        finally:
            log.info(
                "%s operation completed in %.2f ms", operation, (time.perf_counter() - start) * 1000
            )

    return wrapper


def _shm_name_to_path(name: Any) -> str | None:
    """``/dev/shm/<name>`` for a plain shared-memory name (a leading slash is
    allowed), None for anything that could leave ``/dev/shm``."""
    if not isinstance(name, str) or not name:
        return None
    base = name[1:] if name.startswith("/") else name
    if not base or "/" in base or base in (".", ".."):
        return None
    return f"/dev/shm/{base}"


def _unblock_shutdown_signals() -> None:
    """Undo a SIGINT/SIGTERM mask inherited from the parent (a launcher may block them)."""
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    except (AttributeError, OSError):
        pass


def _install_shutdown_signal_handlers(loop: Any, shutdown_event: asyncio.Event) -> None:
    """SIGINT/SIGTERM set ``shutdown_event`` (through the loop when it can
    handle signals, else through a plain handler that hops onto it)."""

    def request_shutdown(signum: int) -> None:
        log.info("Received signal %s, shutting down", signum)
        shutdown_event.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, request_shutdown, sig)
        except (NotImplementedError, RuntimeError):
            signal.signal(
                sig, lambda signum, _frame: loop.call_soon_threadsafe(request_shutdown, signum)
            )


def _segment_ids(data: dict[str, Any]) -> list[str]:
    ids = data.get("segment_ids", [])
    return [ids] if isinstance(ids, str) else list(ids)


class MooncakeStoreService:
    """A store client (owning ``global_segment_size`` of the pool) and its REST API.

    Args:
        config_path: a JSON config file; None reads the ``MOONCAKE_*`` environment.
        cli_config: overrides by field name (``-D key=value``).

    Raises:
        ValueError/OSError: the configuration cannot be loaded.
    """

    def __init__(
        self, config_path: str | None = None, cli_config: dict[str, Any] | None = None
    ) -> None:
        self.store: Any = None
        self.current_mode = "prefill"
        self.mounted_segment_ids: list[str] = []
        self.last_mount_info: dict[str, Any] = {}
        self._state_lock = asyncio.Lock()
        self._runner: Any = None
        try:
            self.config = (
                MooncakeConfig.from_file(config_path)
                if config_path
                else MooncakeConfig.load_from_env()
            )
            for key, value in (cli_config or {}).items():
                if hasattr(self.config, key):
                    setattr(self.config, key, value)
                else:
                    log.warning("ignoring unknown config override %r", key)
        except Exception as exc:
            log.error("Configuration load failed: %s", exc)
            raise
        log.info("Mooncake configuration loaded")

    # --- the store ---------------------------------------------------------------------

    def _setup_values(self) -> dict[str, Any]:
        c = self.config
        return {
            "local_hostname": c.local_hostname,
            "metadata_server": c.metadata_server,
            "global_segment_size": c.global_segment_size,
            "local_buffer_size": c.local_buffer_size,
            "protocol": c.protocol,
            "rdma_devices": c.device_name,
            "master_server_addr": c.master_server_address,
            "enable_ssd_offload": c.enable_ssd_offload,
            "ssd_offload_path": c.ssd_offload_path,
            "tenant_id": c.tenant_id,
            "enable_client_http_server": getattr(c, "enable_client_http_server", False),
            "client_http_port": getattr(c, "client_http_port", 9300),
        }

    async def start_store_service(
        self, max_wait_time: float = 60, shutdown_event: asyncio.Event | None = None
    ) -> bool:
        """Set the store up, retrying every second for up to ``max_wait_time``
        seconds (the master may start later).  A set ``shutdown_event`` cancels
        the wait.  Returns whether the store is up."""
        attempt = 0
        start = time.perf_counter()
        if shutdown_event is not None:
            await asyncio.sleep(0)  # a signal that arrived just before startup
        while True:
            if shutdown_event is not None and shutdown_event.is_set():
                log.info("Store startup cancelled by shutdown request")
                return False
            elapsed = time.perf_counter() - start
            if elapsed >= max_wait_time:
                log.error(
                    "Store startup failed: exceeded max wait time of %ss after %d attempts",
                    max_wait_time,
                    attempt,
                )
                return False
            attempt += 1
            log.info(
                "Attempting to start store service (attempt %d, elapsed: %.1fs/%ss)",
                attempt,
                elapsed,
                max_wait_time,
            )
            try:
                self.store = MooncakeDistributedStore()
                rc = self.store.setup(self._setup_values())
                if shutdown_event is not None:
                    await asyncio.sleep(0)  # setup() blocked the loop: look at signals now
                    if shutdown_event.is_set():
                        log.info("Store startup cancelled by shutdown request")
                        await self.stop()
                        return False
                if rc != 0:
                    raise RuntimeError(f"Store initialization failed (setup returned {rc})")
                log.info("Store service started successfully on %s", self.config.local_hostname)
                return True
            except Exception as exc:
                remaining = max_wait_time - (time.perf_counter() - start)
                pause = min(1.0, remaining) if remaining > 0 else 0.0
                log.warning(
                    "Store startup failed (attempt %d): %s. Retrying in %.1fs... (remaining time: %.1fs)",
                    attempt,
                    exc,
                    pause,
                    remaining,
                )
                if pause <= 0:
                    continue
                if shutdown_event is None:
                    await asyncio.sleep(pause)
                    continue
                try:
                    await asyncio.wait_for(shutdown_event.wait(), timeout=pause)
                    log.info("Store startup cancelled by shutdown request")
                    return False
                except asyncio.TimeoutError:
                    pass

    async def start_http_service(self, port: int = 8080, host: str = "0.0.0.0") -> bool:
        """Serve the REST API on ``host:port`` (0: any free port, see :attr:`port`)."""
        w = _web()
        app = w.Application(client_max_size=_MAX_BODY_BYTES)
        routes = [
            ("POST", "/api/reconfigure", "RECONFIGURE", self.handle_reconfigure),
            ("POST", "/api/mount_shm", "MOUNT_SHM", self.handle_mount_shm),
            ("POST", "/api/unmount_shm", "UNMOUNT_SHM", self.handle_unmount_shm),
            ("POST", "/api/mount", "MOUNT", self.handle_mount),
            ("POST", "/api/unmount", "UNMOUNT", self.handle_unmount),
            (
                "POST",
                "/api/unmount_local_disk",
                "UNMOUNT_LOCAL_DISK",
                self.handle_unmount_local_disk,
            ),
            ("PUT", "/api/put", "PUT", self.handle_put),
            ("GET", "/api/get/{key}", "GET", self.handle_get),
            ("GET", "/api/exist/{key}", "EXIST", self.handle_exist),
            ("DELETE", "/api/remove/{key}", "REMOVE", self.handle_remove),
            ("DELETE", "/api/remove_all", "REMOVE_ALL", self.handle_remove_all),
        ]
        for method, path, name, handler in routes:
            app.router.add_route(method, path, _timed_handler(name, handler))
        self._runner = w.AppRunner(app)
        await self._runner.setup()
        site = w.TCPSite(self._runner, host, port)
        await site.start()
        self.port = self._runner.addresses[0][1] if self._runner.addresses else port
        log.info("REST API started on port %s", self.port)
        return True

    async def stop(self) -> None:
        """Stop the HTTP server and close the store (idempotent)."""
        runner, self._runner = getattr(self, "_runner", None), None
        if runner is not None:
            await runner.cleanup()
        store, self.store = self.store, None
        if store is not None:
            rc = store.close()
            if rc != 0:
                log.warning("Mooncake service close returned %s", rc)
            else:
                log.info("Mooncake service stopped")

    # --- data routes ---------------------------------------------------------------------

    async def handle_put(self, request: Any) -> Any:
        try:
            data = await request.json()
            key = data.get("key")
            value = data.get("value")
            if not key or value is None:
                return _error(400, "Missing key or value")
            if self.store.put(key, value.encode()) != 0:  # a non-string value fails: 500
                return _error(500, "PUT operation failed")
            return _json(200, {"status": "success"})
        except Exception as exc:
            log.error("PUT error: %s", exc)
            return _error(500, str(exc))

    async def handle_get(self, request: Any) -> Any:
        try:
            key = request.match_info["key"]
            exists = self.store.is_exist(key)
            if exists == 0:
                return _error(404, "Key not found")
            if exists < 0:
                return _error(500, "Exist check failed")
            value = self.store.get(key)
            if value is None:
                return _error(500, "GET operation failed")
            if value == b"":  # removed (or evicted) between the check and the read?
                exists = self.store.is_exist(key)
                if exists == 0:
                    return _error(404, "Key not found")
                if exists < 0:
                    return _error(500, "Exist check failed")
            return _web().Response(status=200, body=value, content_type="application/octet-stream")
        except Exception as exc:
            log.error("GET error: %s", exc)
            return _error(500, str(exc))

    async def handle_exist(self, request: Any) -> Any:
        try:
            exists = self.store.is_exist(request.match_info["key"])
            if exists < 0:
                return _error(500, "Exist check failed")
            return _json(200, {"exists": exists > 0})
        except Exception as exc:
            log.error("EXIST error: %s", exc)
            return _error(500, str(exc))

    async def handle_remove(self, request: Any) -> Any:
        try:
            if self.store.remove(request.match_info["key"]) != 0:
                return _error(500, "Remove operation failed")
            return _json(200, {"status": "success"})
        except Exception as exc:
            log.error("REMOVE error: %s", exc)
            return _error(500, str(exc))

    async def handle_remove_all(self, request: Any) -> Any:
        try:
            removed = self.store.remove_all()
            if removed < 0:
                return _error(500, "RemoveAll operation failed")
            return _json(200, {"status": f"success removed {removed} keys"})
        except Exception as exc:
            log.error("REMOVE_ALL error: %s", exc)
            return _error(500, str(exc))

    # --- segment routes --------------------------------------------------------------------

    async def handle_mount_shm(self, request: Any) -> Any:
        try:
            data = await request.json()
            path = _shm_name_to_path(data.get("name"))
            size = data.get("size")
            if not path or size is None:
                return _error(400, "Missing or invalid name or size")
            result = self.store.mount_segment(
                path,
                size,
                data.get("offset", 0),
                data.get("protocol", self.config.protocol),
                data.get("location", ""),
            )
            if result["ret"] != 0:
                return _error(500, f"Mount failed, ret={result['ret']}")
            return _json(200, {"status": "success", "segment_ids": list(result["segment_ids"])})
        except Exception as exc:
            log.error("MOUNT_SHM error: %s", exc)
            return _error(500, str(exc))

    async def handle_unmount_shm(self, request: Any) -> Any:
        try:
            data = await request.json()
            ids = _segment_ids(data)
            if not ids:
                return _error(400, "Missing segment_ids")
            grace = data.get("grace_period_seconds", 0)
            failed = []
            async with self._state_lock:
                for sid in ids:  # one at a time: the store reports only a batch's first error
                    if self.store.unmount_segment([sid], grace) != 0:
                        failed.append(sid)
                    elif sid in self.mounted_segment_ids:
                        self.mounted_segment_ids.remove(sid)
                if not self.mounted_segment_ids:
                    self.current_mode = "prefill"
            if failed:
                return _error(
                    500, "Unmount failed for one or more segments", failed_segment_ids=failed
                )
            return _json(200, {"status": "success"})
        except Exception as exc:
            log.error("UNMOUNT_SHM error: %s", exc)
            return _error(500, str(exc))

    async def handle_mount(self, request: Any) -> Any:
        try:
            data = await request.json()
            size = data.get("size")
            if type(size) is not int or size <= 0:
                return _error(400, "Invalid size, must be a positive integer")
            result = self.store.allocate_and_mount_segment(
                size, data.get("protocol", self.config.protocol), data.get("location", "")
            )
            if result["ret"] != 0:
                return _error(500, f"Allocate and mount failed, ret={result['ret']}")
            return _json(
                200,
                {
                    "status": "success",
                    "segment_ids": list(result["segment_ids"]),
                    "allocated_size": result["allocated_size"],
                },
            )
        except Exception as exc:
            log.error("MOUNT error: %s", exc)
            return _error(500, str(exc))

    async def handle_unmount(self, request: Any) -> Any:
        try:
            data = await request.json()
            ids = _segment_ids(data)
            if not ids:
                return _error(400, "Missing segment_ids")
            rc = self.store.unmount_and_free_segment(ids, data.get("grace_period_seconds", 0))
            if rc != 0:
                return _error(500, f"Unmount and free failed, ret={rc}")
            return _json(200, {"status": "success"})
        except Exception as exc:
            log.error("UNMOUNT error: %s", exc)
            return _error(500, str(exc))

    async def handle_unmount_local_disk(self, request: Any) -> Any:
        """Deregister the SSD offload tier before the process goes (a preStop
        hook); runs off the event loop because the grace period is a wait."""
        try:
            data = await request.json()
        except Exception:
            return _error(400, "Malformed JSON body")
        if not isinstance(data, dict):
            return _error(400, "Request body must be a JSON object")
        grace = data.get("grace_period_seconds", 0)
        if type(grace) is not int or not 0 <= grace <= _MAX_UNMOUNT_LOCAL_DISK_GRACE_PERIOD_SECONDS:
            return _error(
                400,
                "Invalid grace_period_seconds, must be a non-negative integer no greater than "
                f"{_MAX_UNMOUNT_LOCAL_DISK_GRACE_PERIOD_SECONDS}",
            )
        try:
            rc = await asyncio.to_thread(self.store.unmount_local_disk_segment, grace)
            if rc != 0:
                return _error(500, f"Unmount local disk failed, ret={rc}")
            return _json(200, {"status": "success"})
        except Exception as exc:
            log.error("UNMOUNT_LOCAL_DISK error: %s", exc)
            return _error(500, str(exc))

    async def handle_reconfigure(self, request: Any) -> Any:
        """Switch to decode (mount ``path``) or back to prefill (unmount)."""
        try:
            data = await request.json()
            mode = str(data.get("mode", "")).lower()
            if mode == "decode":
                return await self._to_decode(data)
            if mode == "prefill":
                async with self._state_lock:
                    if self.mounted_segment_ids:
                        rc = self.store.unmount_segment(self.mounted_segment_ids)
                        if rc != 0:
                            return _error(500, f"Unmount failed, ret={rc}")
                        self.mounted_segment_ids.clear()
                    self.current_mode = "prefill"
                    self.last_mount_info.clear()
                return _json(200, {"status": "success", "mode": self.current_mode})
            return _error(400, "Invalid mode. Use 'decode' or 'prefill'")
        except Exception as exc:
            log.error("RECONFIGURE error: %s", exc)
            return _error(500, str(exc))

    async def _to_decode(self, data: dict[str, Any]) -> Any:
        path, size = data.get("path"), data.get("size")
        if not path or size is None:
            return _error(400, "Missing path or size for decode mode")
        info = {
            "path": path,
            "offset": data.get("offset", 0),
            "size": size,
            "protocol": data.get("protocol", self.config.protocol),
            "location": data.get("location", ""),
        }
        async with self._state_lock:
            previous = list(self.mounted_segment_ids)
            # make before break: the new segment first, the old ones only once it serves
            result = self.store.mount_segment(
                path, size, info["offset"], info["protocol"], info["location"]
            )
            if result["ret"] != 0:
                if previous:
                    log.warning(
                        "Reconfigure decode: mount of %s failed (ret=%s); keeping previous decode segments",
                        path,
                        result["ret"],
                    )
                    return _error(
                        500,
                        f"Mount failed, ret={result['ret']}; keeping previous decode segments",
                        mode=self.current_mode,
                    )
                self.current_mode = "prefill"
                self.mounted_segment_ids.clear()
                self.last_mount_info.clear()
                return _error(
                    500,
                    f"Mount failed, ret={result['ret']}; rolled back to prefill",
                    mode=self.current_mode,
                )
            # retire the old segments one by one, keeping track of any that refuse to go
            stuck = [sid for sid in previous if self.store.unmount_segment([sid]) != 0]
            if stuck:
                log.warning(
                    "Reconfigure decode: new mount succeeded but unmount of previous segments %s "
                    "failed; keeping them tracked for future cleanup",
                    stuck,
                )
            self.mounted_segment_ids = list(result["segment_ids"]) + stuck
            self.current_mode = "decode"
            self.last_mount_info = info
        return _json(
            200,
            {
                "status": "success",
                "mode": self.current_mode,
                "segment_ids": self.mounted_segment_ids,
            },
        )


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Mooncake Store Service with REST API")
    parser.add_argument("--config", type=str, help="Path to Mooncake config file", required=False)
    parser.add_argument(
        "-D",
        "--define",
        action="append",
        default=[],
        help="Override configuration with key=value pairs (e.g., -Dlocal_hostname=example.com)",
    )
    parser.add_argument("--port", type=int, default=8080, help="HTTP API port (default: 8080)")
    parser.add_argument(
        "--max-wait-time",
        type=float,
        default=60,
        help="Maximum total wait time in seconds for the store to start (default: 60)",
    )
    return parser.parse_args(argv)


async def main() -> None:
    args = parse_arguments()
    overrides: dict[str, Any] = {}
    for item in args.define:
        key, sep, value = item.partition("=")
        if sep:
            overrides[key] = value
        else:
            log.warning("Ignoring invalid CLI config: %s", item)
    service = MooncakeStoreService(args.config, overrides)
    shutdown = asyncio.Event()
    _install_shutdown_signal_handlers(asyncio.get_running_loop(), shutdown)
    _unblock_shutdown_signals()
    try:
        if not await service.start_store_service(
            max_wait_time=args.max_wait_time, shutdown_event=shutdown
        ):
            if shutdown.is_set():
                return
            raise RuntimeError("Failed to start store service")
        _unblock_shutdown_signals()
        await asyncio.sleep(0)
        if shutdown.is_set():
            return
        if not await service.start_http_service(args.port):
            raise RuntimeError("Failed to start HTTP service")
        log.info("Mooncake Store Service is running")
        await shutdown.wait()
    except KeyboardInterrupt:
        log.info("Received keyboard interrupt, shutting down")
    finally:
        await service.stop()


def sync_main() -> None:
    """Entry point of ``mc_store_rest_server``."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s"
    )
    asyncio.run(main())


if __name__ == "__main__":
    sync_main()
