"""EtcdProcess: a real etcd on loopback ports, stopped, killed and restarted with its data."""

from __future__ import annotations

import base64
import json
import sys
import urllib.request
from pathlib import Path

import pytest

from dmc.errors import FailedPrecondition
from dmc_ca import etcd_process
from dmc_ca.etcd_process import EtcdProcess, find_etcd_binary


def _health(process: EtcdProcess) -> dict[str, str]:
    with urllib.request.urlopen(f"{process.client_url}/health", timeout=2) as response:
        result: dict[str, str] = json.loads(response.read())
        return result


def _put(process: EtcdProcess, key: str, value: str) -> None:
    # etcd's JSON gateway takes base64 keys and values; it keeps this test free of a client.
    body = json.dumps(
        {
            "key": base64.b64encode(key.encode()).decode(),
            "value": base64.b64encode(value.encode()).decode(),
        }
    ).encode()
    request = urllib.request.Request(f"{process.client_url}/v3/kv/put", data=body)
    with urllib.request.urlopen(request, timeout=2) as response:
        response.read()


def _get(process: EtcdProcess, key: str) -> str | None:
    body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
    request = urllib.request.Request(f"{process.client_url}/v3/kv/range", data=body)
    with urllib.request.urlopen(request, timeout=2) as response:
        kvs = json.loads(response.read()).get("kvs", [])
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else None


def test_find_etcd_binary_prefers_the_one_beside_the_interpreter() -> None:
    assert find_etcd_binary() == Path(sys.executable).parent / "etcd"


def test_find_etcd_binary_fails_clearly_when_there_is_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(etcd_process.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(FailedPrecondition, match="no etcd binary found"):
        find_etcd_binary()


def test_etcd_starts_on_loopback_and_logs_to_a_file(tmp_path: Path) -> None:
    with EtcdProcess(tmp_path / "etcd", fast=True) as process:
        assert process.endpoint.startswith("127.0.0.1:")
        assert _health(process)["health"] == "true"
        assert process.running

    assert not process.running
    assert (tmp_path / "etcd.log").is_file()
    assert (tmp_path / "etcd" / "member").is_dir()


def test_etcd_restart_keeps_data_and_ports(tmp_path: Path) -> None:
    process = EtcdProcess(tmp_path / "etcd", fast=True, log_path=tmp_path / "logs" / "e.log")
    process.start()
    try:
        endpoint = process.endpoint
        _put(process, "/k", "v1")

        process.stop()
        assert not process.running
        process.start()

        assert process.endpoint == endpoint
        assert _get(process, "/k") == "v1"
    finally:
        process.stop()
    assert (tmp_path / "logs" / "e.log").is_file()


def test_a_new_process_on_an_existing_data_dir_keeps_the_data(tmp_path: Path) -> None:
    # dmc-ca dev's second run: fresh ports, the same data folder.
    with EtcdProcess(tmp_path / "etcd", fast=True) as first:
        _put(first, "/k", "v1")

    with EtcdProcess(tmp_path / "etcd", fast=True) as second:
        assert _get(second, "/k") == "v1"
        _put(second, "/k", "v2")
        assert _get(second, "/k") == "v2"


def test_etcd_comes_back_after_kill(tmp_path: Path) -> None:
    process = EtcdProcess(tmp_path / "etcd", fast=True)
    process.start()
    try:
        _put(process, "/k", "v1")
        process.kill()
        assert not process.running

        process.start()

        assert _get(process, "/k") == "v1"
    finally:
        process.stop()


def test_etcd_in_durable_mode_starts(tmp_path: Path) -> None:
    with EtcdProcess(tmp_path / "etcd", fast=False) as process:
        assert _health(process)["health"] == "true"
        assert "--unsafe-no-fsync" not in process._command(find_etcd_binary())
