"""Existing firmware, unchanged: Azure's global provisioning name built in (README, "Pointing
existing firmware at Fleetgate").

The official device SDK runs as a separate program in a private mount namespace whose /etc/hosts
sends `global.azure-devices-provisioning.net` and the hub name to this server's loopback address,
as an operator's hosts-file override would; nothing on the machine changes. The server is started
as the README says (`--hostname HUB --hostname global.azure-devices-provisioning.net`) and the
device trusts the server's `ca.pem`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import ServiceApi, derive_device_key, parse_connection_string, unique

GLOBAL_ENDPOINT = "global.azure-devices-provisioning.net"
HUB_NAME = "hub.factory.example"
DEVICE_PROGRAM = Path(__file__).with_name("firmware_device.py")
DEVICE_TIMEOUT_S = 60.0


def _namespaces_unavailable() -> str | None:
    """Why a private mount namespace with a bind-mounted /etc/hosts cannot be had here, if so."""
    if shutil.which("unshare") is None:
        return "`unshare` (util-linux) is not installed"
    if os.geteuid() != 0:
        return "a private mount namespace needs root (CAP_SYS_ADMIN)"
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount --bind /etc/hosts /etc/hosts"],
                           capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"`unshare --mount` with a bind mount is not permitted here: {probe.stderr.strip()}"
    return None


def _resolves_to(name: str, address: str) -> bool:
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET)
    except OSError:
        return False
    return any(info[4][0] == address for info in infos)


def test_unmodified_firmware_provisions_through_azure_global_name(server_factory, tmp_path):
    why = _namespaces_unavailable()
    if why:
        pytest.skip(f"hosts-file override not possible: {why}")

    srv = server_factory("firmware-names")
    # README: the first --hostname names the hub; every name devices dial is listed. The loopback
    # address is listed too, for this test's own service API calls.
    srv.hostnames = [HUB_NAME, GLOBAL_ENDPOINT, srv.address]
    srv.start()
    assert srv.hub_hostname == HUB_NAME

    # Outside the namespace the name does not lead here: only the override can make the device
    # reach this server (and a wrong override would fail the run below).
    assert not _resolves_to(GLOBAL_ENDPOINT, srv.address), f"{GLOBAL_ENDPOINT} already resolves to {srv.address}"
    assert not _resolves_to(HUB_NAME, srv.address), f"{HUB_NAME} already resolves to {srv.address}"

    # The service API is reached by address; its token names the address, which the server also carries.
    key = parse_connection_string(srv.instance["serviceConnectionString"])["SharedAccessKey"]
    service = ServiceApi(
        f"HostName={srv.address}:{srv.https_port};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={key}",
        srv.ca_path)
    group_id = unique("firmware")
    primary = service.create_group(group_id)["attestation"]["symmetricKey"]["primaryKey"]
    device_id = unique("fw-device")
    device_key = derive_device_key(primary, device_id)
    message_id = f"fw-{uuid.uuid4().hex[:8]}"

    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n::1 localhost\n{srv.address} {GLOBAL_ENDPOINT}\n{srv.address} {HUB_NAME}\n")
    device_cmd = [sys.executable, str(DEVICE_PROGRAM), srv.id_scope, device_id, device_key, srv.ca_path, message_id]
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts), *device_cmd],
        capture_output=True, text=True, timeout=DEVICE_TIMEOUT_S)
    assert run.returncode == 0, f"device program failed ({run.returncode}):\n{run.stdout}\n{run.stderr[-4000:]}"
    report = json.loads(run.stdout.strip().splitlines()[-1])

    # The device dialled Azure's names, and they led to this server (whose certificate it checked).
    assert report["resolved"] == {GLOBAL_ENDPOINT: srv.address, HUB_NAME: srv.address}, report
    assert report["status"] == "assigned", report
    assert report["assigned_hub"] == HUB_NAME, report
    assert report["device_id"] == device_id, report
    assert report.get("sent") is True, report

    r = service.get_registration(device_id)
    assert r.status_code == 200, f"GET /registrations/{device_id}: {r.status_code} {r.text}"
    record = r.json()
    assert record["status"] == "assigned", record
    assert record["assignedHub"] == HUB_NAME, record
    assert record["deviceId"] == device_id, record

    events = srv.hub_service.wait_for_events(device_id, 1)
    assert [e["event"]["properties"]["system"].get("message-id") for e in events] == [message_id], events
    assert events[0]["event"]["payload"] == {"firmware": "unchanged"}, events
