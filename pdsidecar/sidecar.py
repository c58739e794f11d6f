"""`pdsidecar run`: the P/D sidecar process (prefill or decode role).

`run_sidecar(argv) -> int` parses flags > env > defaults (pdsidecar.config), prints the
effective config with `--print-config`, else serves until SIGTERM/SIGINT, then drains:
`/ready` turns 503 at once, new requests get 503 + Retry-After, in-flight requests finish
(up to `--drain-grace`), and the process exits 0 (1 when the grace period ran out).
Exit 2 on invalid configuration (one line on stderr, no traceback).

`--workers N` (N > 1) makes this process a supervisor of N workers sharing the port
(pdsidecar.workers); a worker is this same entry point with `PDSIDECAR_WORKER_INDEX` set.
N = 1 is one process, no supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from pdsidecar.config import ConfigError, load_config, render_config
from pdsidecar.workers import die_with_supervisor, supervise, worker_index
from proxy.config import SidecarConfig

log = logging.getLogger("pdsidecar.sidecar")


async def serve(cfg: SidecarConfig, stop: asyncio.Event | None = None, worker: int | None = None) -> int:
    from proxy.server import Sidecar
    from proxy.tracing import setup_tracing

    setup_tracing(cfg.otel, f"pdsidecar-{cfg.role}")
    sidecar = Sidecar(cfg, worker=worker)
    try:
        await sidecar.start()
    except OSError as e:
        log.error("cannot listen", extra={"host": cfg.host, "port": cfg.port, "error": e.strerror or str(e)})
        await sidecar.stop()
        return 1
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await stop.wait()
    clean = await sidecar.drain()
    log.info("stopped", extra={"clean": clean})
    return 0 if clean else 1


def run_sidecar(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, print_config = load_config(argv)
    except ConfigError as e:
        print(f"pdsidecar run: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if print_config:
        print(render_config(cfg))
        return 0
    from proxy.logs import setup_logging

    setup_logging(cfg.log_level, cfg.log_format)
    worker = worker_index()
    if worker is None and cfg.workers > 1:
        try:
            return supervise(cfg, argv)
        except KeyboardInterrupt:
            return 130
    if worker is not None:
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            print("pdsidecar run: error: PDSIDECAR_WORKER_INDEX is set by the --workers supervisor only",
                  file=sys.stderr)
            return 2
        _tag_logs(worker)
        if not die_with_supervisor():
            log.error("supervisor gone before this worker started")
            return 1
    try:
        import uvloop  # type: ignore

        uvloop.install()
    except ImportError:
        pass
    try:
        return asyncio.run(serve(cfg, worker=worker))
    except KeyboardInterrupt:
        return 130


def _tag_logs(worker: int) -> None:
    """Every log line of a worker carries `worker: <index>`."""

    def tag(record: logging.LogRecord) -> bool:
        record.worker = worker
        return True

    for h in logging.getLogger().handlers:
        h.addFilter(tag)


def main() -> None:
    sys.exit(run_sidecar(sys.argv[1:]))


if __name__ == "__main__":
    main()
