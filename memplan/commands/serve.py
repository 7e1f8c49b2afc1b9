"""`memplan serve [--port P] [--config PATH ...]`: the planner in the browser (memplan/web/), on 127.0.0.1.

Binding any other address needs --allow-remote and prints a warning: the app has no authentication. The server
reads only the files named here (--config) and its own page; a request never names a path. Needs the `web` extra
(starlette, uvicorn, plotly's JavaScript); imports no torch.
"""
from __future__ import annotations

import ipaddress
import sys

DEFAULT_PORT = 8765


def register(sub) -> None:
    p = sub.add_parser("serve", help="interactive planner in the browser (needs memplan[web])",
                       description="Serve the planner as a local web page: every training flag as a form, the "
                                   "estimate, per-GPU verdicts and fit's changes live; the URL holds the settings.")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1; anything else needs --allow-remote)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding a non-loopback address (no authentication: anyone who reaches it can use it)")
    p.add_argument("--config", action="append", default=[], metavar="PATH",
                   help="also offer this local config.json (or a folder holding one); repeatable. The page picks it "
                        "by its label; the server reads no other file")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accept a --config that asks for remote code (auto_map); memplan reads its fields only")
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    from memplan.errors import MemplanError

    if not 0 < args.port < 65536:
        raise MemplanError(f"--port {args.port}: give a port between 1 and 65535")
    remote = not is_loopback(args.host)
    if remote and not args.allow_remote:
        raise MemplanError(f"--host {args.host} is not a loopback address: the planner has no authentication, so "
                           "binding it needs --allow-remote")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MemplanError(f"memplan serve needs the web extra ({e.name} is missing): pip install 'memplan[web]'") from None
    from memplan.report.figures import plotly_js
    from memplan.web.api import Models
    from memplan.web.app import create_app

    models = Models(args.config, trust_remote_code=args.trust_remote_code)
    app = create_app(models, allow_remote=remote)
    if plotly_js() is None:
        print("memplan serve: warning: plotly is not installed, the page shows tables only "
              "(pip install 'memplan[web]')", file=sys.stderr)
    if remote:
        print(f"memplan serve: warning: listening on {args.host}, reachable from other machines, without "
              "authentication", file=sys.stderr)
    import socket

    import uvicorn

    try:  # uvicorn logs a failed bind and exits; bind first so the user gets the CLI's one line
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host.strip("[]"), args.port))
    except OSError as e:
        raise MemplanError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    shown = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    print(f"memplan serve: http://{shown}:{args.port}/  (Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=args.host.strip("[]"), port=args.port, log_level="warning", access_log=False)
    return 0
