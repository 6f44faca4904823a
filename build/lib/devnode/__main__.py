"""Start the dev node: `python -m devnode --port 8700 [--host 127.0.0.1]`.

This module owns the process: the environment that keeps Gradio and Hugging Face offline (set before
Gradio is imported), logging, and uvicorn with a short graceful shutdown so a hung engine or an open
event stream never keeps the process alive. On SIGINT/SIGTERM every node is stopped first.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "GRADIO_SSR_MODE": "False",
    "GRADIO_MCP_SERVER": "False",
    "DO_NOT_TRACK": "1",
}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and serve until SIGINT/SIGTERM."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(prog="python -m devnode", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    parser.add_argument("--port", type=int, default=8700)
    parser.add_argument("--public-host", default=os.environ.get("DEVNODE_PUBLIC_HOST", ""),
                        help="host[:port] that workers reach this dev node at, used in the `node` of "
                             "launch answers (default: --host:--port); e.g. devnode:8700 in docker compose")
    parser.add_argument("--log-level", default=os.environ.get("DEVNODE_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format=log_format)

    import uvicorn

    from devnode import faults, server

    public_host, _, public_port = (args.public_host or f"{args.host}:{args.port}").partition(":")
    app = server.create_app(host=public_host, port=int(public_port or args.port))
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=3,
        lifespan="on",
    )
    uv = uvicorn.Server(config)
    original_exit = uv.handle_exit

    def begin_shutdown(sig: int) -> None:
        faults.SHUTDOWN.set()  # hung engines end now, before uvicorn waits for connections
        server.stop_all_nodes(f"signal {sig}")

    def handle_exit(sig: int, frame: object) -> None:
        # A signal handler must not take locks (Event.set does): defer to the event loop.
        try:
            asyncio.get_running_loop().call_soon_threadsafe(begin_shutdown, sig)
        except RuntimeError:
            pass
        original_exit(sig, frame)

    uv.handle_exit = handle_exit  # type: ignore[method-assign]
    uv.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
