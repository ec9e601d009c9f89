"""The caller: a frontend whose scope permits reading the inventory and nothing else.

Its entry grants ``/demo.Inventory/Get`` with the inventory as the one audience, so Get
succeeds and Delete is refused by the inventory's interceptor (PERMISSION_DENIED). With
``--every SECONDS`` it keeps calling Get; revoke it meanwhile (README.md) to see the
inventory refuse it within a moment.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import grpc
from _dev import FRONTEND_ID, INVENTORY_DNS, INVENTORY_ID, add_dev_arguments, enroll

import dmc


def call(channel: grpc.Channel, method: str, item: str) -> None:
    request = json.dumps({"item": item}).encode()
    try:
        reply = channel.unary_unary(f"/demo.Inventory/{method}")(request, timeout=10)
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        print(f"{method} {item}: refused: {error.code().name}: {error.details()}", flush=True)
    else:
        print(f"{method} {item}: {json.loads(reply)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_dev_arguments(parser)
    parser.add_argument("--inventory", default="127.0.0.1:50051", help="the inventory's address")
    parser.add_argument("--every", type=float, help="keep calling Get every SECONDS")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    source = enroll(
        "frontend",
        FRONTEND_ID,
        ca=args.ca,
        dev_dir=args.dev_dir,
        permissions=["/demo.Inventory/Get"],
        audiences=[INVENTORY_ID],
    )
    # The inventory is pinned by the DNS name in its SVID (SPEC §7).
    with source, dmc.secure_channel(args.inventory, source, server_name=INVENTORY_DNS) as channel:
        call(channel, "Get", "widget")
        call(channel, "Delete", "widget")
        try:
            while args.every:
                time.sleep(args.every)
                call(channel, "Get", "widget")
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
