"""The callee: an inventory service that lets each caller do only what its scope permits.

Its identity (``spiffe://example.org/demo/inventory``, DNS name ``inventory.example.org``)
renews itself; the server presents the current SVID, requires a client certificate, and
the authorizing interceptor checks every call against the caller's scope and the CA's
revocations. Run it against ``./run dev``; see README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from _dev import INVENTORY_DNS, INVENTORY_ID, add_dev_arguments, enroll

import dmc

_log = logging.getLogger("inventory")

_stock = {"widget": 3, "gadget": 1}
_stock_lock = threading.Lock()


def get(request: bytes, context: grpc.ServicerContext) -> bytes:
    item = json.loads(request)["item"]
    peer = dmc.current_peer()
    _log.info("Get %s for %s%s", item, peer.spiffe_id, _delegated_by(peer))
    with _stock_lock:
        count = _stock.get(item, 0)
    return _reply({"item": item, "count": count, "caller": str(peer.spiffe_id)})


def delete(request: bytes, context: grpc.ServicerContext) -> bytes:
    item = json.loads(request)["item"]
    peer = dmc.current_peer()
    _log.info("Delete %s for %s", item, peer.spiffe_id)
    with _stock_lock:
        removed = _stock.pop(item, 0)
    return _reply({"item": item, "removed": removed})


def _delegated_by(peer: dmc.Peer) -> str:
    if not peer.delegators:
        return ""
    return ", delegated by " + " <- ".join(str(d) for d in reversed(peer.delegators))


def _reply(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_dev_arguments(parser)
    parser.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to serve on")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    source = enroll(
        "inventory", INVENTORY_ID, ca=args.ca, dev_dir=args.dev_dir, dns_names=[INVENTORY_DNS]
    )
    with (
        source,
        # The CA serves WatchRevocations over mTLS; the inventory's own SVID opens it.
        dmc.secure_channel(args.ca, source) as ca_channel,
        dmc.RevocationFollower(ca_channel) as revocations,
    ):
        server = grpc.server(
            ThreadPoolExecutor(max_workers=8),
            interceptors=[dmc.AuthorizingInterceptor.from_source(source, revocations=revocations)],
            handlers=[
                grpc.method_handlers_generic_handler(
                    "demo.Inventory",
                    {
                        "Get": grpc.unary_unary_rpc_method_handler(get),
                        "Delete": grpc.unary_unary_rpc_method_handler(delete),
                    },
                )
            ],
        )
        server.add_secure_port(args.listen, dmc.server_credentials(source))
        server.start()
        print(f"inventory: serving {INVENTORY_ID} on {args.listen}; Ctrl-C to stop", flush=True)

        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
        server.stop(2).wait()


if __name__ == "__main__":
    main()
