"""The device transports of the HTTPS port, end to end.

* MQTT over WebSockets with the unmodified Python SDK (``websockets=True``): DPS registration and
  hub telemetry. The SDK dials port 443 for websockets, so these tests start their own server on
  its own 127.0.0.N address with ``--https-port 443``.
* DPS over HTTPS with a plain HTTP client (``requests``) following Azure's device REST contract:
  ``PUT /{idScope}/registrations/{registrationId}/register``, polling
  ``GET .../operations/{operationId}`` while the answer is 202, and the ``POST`` status lookup.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import urllib.parse

import pytest
from azure.iot.device import Message, ProvisioningDeviceClient

import conftest
from conftest import (
    _can_bind,
    _tcp_ok,
    call_with_timeout,
    derive_device_key,
    free_port,
    unique,
)

WS_PORT = 443  # hard-coded in the Python SDK for websockets
DEVICE_API_VERSION = "2021-06-01"
JSON_UTF8 = "application/json; charset=utf-8"


@pytest.fixture(scope="module")
def ws_server(server_factory):
    """A server whose HTTPS port is 443 on its own loopback address (the SDK's websocket port).

    Its MQTT port is *not* 8883, so a client that fell back to plain MQTT/TLS would find nothing
    there: whatever works here went over the WebSocket.
    """
    srv = server_factory("websockets")
    if not _can_bind(srv.address, WS_PORT):
        pytest.fail(f"port {WS_PORT} is not bindable on {srv.address} (the SDK's websocket port)", pytrace=False)
    srv.https_port = WS_PORT
    saved = conftest.MQTT_PORT
    conftest.MQTT_PORT = free_port(srv.address)
    try:
        srv.start()
    finally:
        conftest.MQTT_PORT = saved
    assert not _tcp_ok(srv.address, saved)
    return srv


def group_key(service, group_id: str) -> str:
    return service.create_group(group_id)["attestation"]["symmetricKey"]["primaryKey"]


def register_over_websockets(server, registration_id: str, key: str):
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=server.address,
        registration_id=registration_id,
        id_scope=server.id_scope,
        symmetric_key=key,
        server_verification_cert=server.ca_pem,
        websockets=True,
    )
    out = call_with_timeout(client.register, timeout=20, what=f"register({registration_id!r}) over websockets")
    assert out.error is None, f"register raised {out.error!r} (cause {out.error.__cause__!r})"
    return out.result


def test_provisioning_over_websockets(ws_server):
    device_id = unique("ws-dps")
    key = derive_device_key(group_key(ws_server.service, unique("grp-ws")), device_id)
    result = register_over_websockets(ws_server, device_id, key)
    assert result.status == "assigned", result
    assert result.registration_state.device_id == device_id
    assert result.registration_state.assigned_hub == ws_server.hub_hostname
    r = ws_server.service.get_registration(device_id)
    assert r.status_code == 200 and r.json()["status"] == "assigned", r.text


def test_hub_telemetry_over_websockets(ws_server, hub_devices):
    device_id = unique("ws-hub")
    key = derive_device_key(group_key(ws_server.service, unique("grp-ws")), device_id)
    result = register_over_websockets(ws_server, device_id, key)
    hub_name = result.registration_state.assigned_hub

    dev = hub_devices(ws_server, device_id, key, hub_hostname=hub_name, websockets=True)
    dev.connect()
    for i in range(5):
        msg = Message(json.dumps({"i": i, "via": "websockets"}), message_id=f"ws-{i}",
                      content_encoding="utf-8", content_type="application/json")
        msg.custom_properties = {"idx": str(i)}
        dev.send(msg)

    # send_message() returned after the PUBACK, which is sent once the message is stored.
    items = ws_server.hub_service.events(device_id)
    assert [it["event"]["properties"]["system"]["message-id"] for it in items] == [f"ws-{i}" for i in range(5)]
    for i, item in enumerate(items):
        assert item["event"]["origin"] == device_id
        assert item["event"]["payload"] == {"i": i, "via": "websockets"}
        assert item["event"]["properties"]["application"] == {"idx": str(i)}
    assert ws_server.hub_service.get_device(device_id).json()["connectionState"] == "Connected"


# --------------------------------------------------------------------------- DPS over HTTPS


def device_sas(id_scope: str, registration_id: str, key: str, ttl_s: int = 3600) -> str:
    """A device token as the Node/C SDKs build it: sr url-encoded, signed as sent, skn=registration."""
    sr = urllib.parse.quote(f"{id_scope}/registrations/{registration_id}", safe="")
    se = int(time.time()) + ttl_s
    mac = hmac.new(base64.b64decode(key), f"{sr}\n{se}".encode("utf-8"), hashlib.sha256)
    sig = urllib.parse.quote(base64.b64encode(mac.digest()).decode("ascii"), safe="")
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn=registration"


class DeviceHttp:
    """Azure's DPS device REST API, spoken with requests."""

    def __init__(self, server, registration_id: str, key: str):
        self.server = server
        self.registration_id = registration_id
        self.base = (f"https://{server.address}:{server.https_port}/{server.id_scope}"
                     f"/registrations/{urllib.parse.quote(registration_id, safe='')}")
        self.headers = {
            "Authorization": device_sas(server.id_scope, registration_id, key),
            "Accept": "application/json",
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "fleetgate-sdk-tests/1.0",
        }

    def call(self, method: str, path: str, body=None):
        return self.server.service.session.request(
            method, f"{self.base}{path}", params={"api-version": DEVICE_API_VERSION}, headers=self.headers,
            data=None if body is None else json.dumps(body), verify=self.server.ca_path, timeout=15)

    def register(self, payload=None, max_polls: int = 20):
        """PUT register, then poll the operation while the answer is 202, as the SDKs do."""
        r = self.call("PUT", "/register", {"registrationId": self.registration_id, "payload": payload})
        polls = 0
        while r.status_code == 202:
            assert r.headers["Content-Type"] == JSON_UTF8, r.headers
            body = r.json()
            assert body["status"] == "assigning", body
            polls += 1
            assert polls <= max_polls, "still assigning"
            time.sleep(min(int(r.headers.get("Retry-After", "2")), 2))
            r = self.call("GET", f"/operations/{urllib.parse.quote(body['operationId'], safe='')}", {})
        return r, polls


def test_dps_over_https_immediate(server):
    device_id = unique("http-dps")
    key = derive_device_key(group_key(server.service, unique("grp-http")), device_id)
    dev = DeviceHttp(server, device_id, key)
    r, polls = dev.register(payload={"model": "x"})
    assert (r.status_code, polls) == (200, 0), r.text
    assert r.headers["Content-Type"] == JSON_UTF8
    body = r.json()
    assert body["status"] == "assigned", body
    state = body["registrationState"]
    assert state["registrationId"] == device_id
    assert state["deviceId"] == device_id
    assert state["assignedHub"] == server.hub_hostname

    # status lookup: POST with a DeviceRegistration body
    r = dev.call("POST", "", {"registrationId": device_id})
    assert r.status_code == 200, r.text
    assert r.json()["assignedHub"] == server.hub_hostname
    assert r.json()["status"] == "assigned"

    # a wrong key: 401 with Azure's error body
    bad = DeviceHttp(server, device_id, base64.b64encode(b"not the key" * 3).decode())
    r = bad.call("PUT", "/register", {"registrationId": device_id})
    assert r.status_code == 401, r.text
    assert r.headers["Content-Type"] == JSON_UTF8
    assert r.json()["errorCode"] == 401002


def test_dps_over_https_polling(server_factory):
    srv = server_factory("http-polling", registration_response="polling").start()
    device_id = unique("http-poll")
    key = derive_device_key(group_key(srv.service, unique("grp-http")), device_id)
    dev = DeviceHttp(srv, device_id, key)
    r, polls = dev.register()
    assert r.status_code == 200, r.text
    assert polls >= 1
    assert r.json()["status"] == "assigned"
    assert r.json()["registrationState"]["assignedHub"] == srv.hub_hostname

    r = dev.call("GET", "/operations/unknown-operation", {})
    assert r.status_code == 404, r.text
    assert r.headers["Content-Type"] == JSON_UTF8
