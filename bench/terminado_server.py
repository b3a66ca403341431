"""
The terminado baseline's server: terminado's own TermSocket and UniqueTermManager in a
Tornado application, one new terminal running ARGV per WebSocket, TLS 1.3 with the
given certificate.  Run with the interpreter terminado is installed in.  Prints
``terminado listening on PORT``.

    python -m bench.terminado_server CERT KEY ARGV...
"""

from __future__ import annotations

import asyncio
import ssl
import sys


async def _serve(cert: str, key: str, argv: list[str]) -> None:
    import tornado.httpserver
    import tornado.netutil
    import tornado.web
    from terminado import TermSocket, UniqueTermManager

    manager = UniqueTermManager(shell_command=argv)
    app = tornado.web.Application([(r"/websocket", TermSocket, {"term_manager": manager})])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(app, ssl_options=context)
    server.add_sockets(sockets)
    sys.stdout.write(f"terminado listening on {sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    await asyncio.Event().wait()


def main() -> None:
    asyncio.run(_serve(sys.argv[1], sys.argv[2], sys.argv[3:]))


if __name__ == "__main__":
    main()
