"""End-to-end compatibility tests: Fleetgate's hub vs. the Azure IoT Python device SDK (2.14.0).

Device side: azure.iot.device.IoTHubDeviceClient over MQTT/TLS (port 8883), after provisioning
through DPS; a few protocol violations the SDK cannot produce go through a raw paho client.
Service side: the hub REST API (devices, twins, direct methods, plus Fleetgate's C2D send and
telemetry read endpoints) with the hub's `iothubowner` SAS.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import queue
import ssl
import threading
import time
import urllib.parse

import pytest
from azure.iot.device import Message, MethodResponse
from azure.iot.device.exceptions import ClientError, CredentialError, ServiceError

from conftest import (
    MQTT_PORT,
    derive_device_key,
    parse_utc,
    random_key,
    unique,
)

INITIAL_TWIN = {"tags": {"site": "lab"}, "properties": {"desired": {"interval": 30}}}
CONNECT_REFUSED_FAST_S = 10.0  # a refused CONNECT must fail well before any retry loop would matter


# --------------------------------------------------------------------------- helpers


def create_group_with_twin(service, group_id: str, initial_twin: dict) -> str:
    """An enabled symmetric-key enrollment group with an initialTwin; returns its primary key."""
    body = {
        "enrollmentGroupId": group_id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {}},
        "provisioningStatus": "enabled",
        "initialTwin": initial_twin,
    }
    r = service.request("PUT", f"/enrollmentGroups/{urllib.parse.quote(group_id, safe='')}", json_body=body)
    assert r.status_code == 200, f"PUT /enrollmentGroups/{group_id}: {r.status_code} {r.text}"
    assert r.json().get("initialTwin") == initial_twin, r.json()
    return r.json()["attestation"]["symmetricKey"]["primaryKey"]


def without_metadata(section: dict) -> dict:
    """A twin section without its $metadata member."""
    return {k: v for k, v in section.items() if k != "$metadata"}


def provision(server, primary_key: str, device_id: str) -> tuple[str, str]:
    """Register through DPS; returns (device key, assigned hub)."""
    key = derive_device_key(primary_key, device_id)
    out = server.register(device_id, key)
    assert out.error is None, f"register({device_id!r}) raised {out.error!r} (cause {out.error.__cause__!r})"
    assert out.result.status == "assigned", out.result
    state = out.result.registration_state
    assert state.device_id == device_id
    assert state.assigned_hub == server.hub_hostname
    return key, state.assigned_hub


def connect_provisioned(server, hub_devices, primary_key: str, device_id: str):
    key, hub = provision(server, primary_key, device_id)
    dev = hub_devices(server, device_id, key, hub_hostname=hub)
    dev.connect()
    return dev


def telemetry(i: int, tag: str, **extra_props) -> Message:
    msg = Message(json.dumps({"i": i, "tag": tag, "text": "héllo wörld"}),
                  message_id=f"{tag}-{i}", content_encoding="utf-8", content_type="application/json")
    msg.custom_properties = {"idx": str(i), "path": "a/b&c d", "eq": "x=y?z#w", "uni": "grüße €", **extra_props}
    return msg


def assert_telemetry_event(item: dict, device_id: str, i: int, tag: str):
    ev = item["event"]
    assert ev["origin"] == device_id, item
    assert ev["annotations"]["iothub-connection-device-id"] == device_id, item
    parse_utc(ev["annotations"]["iothub-enqueuedtime"])
    system = ev["properties"]["system"]
    assert system.get("message-id") == f"{tag}-{i}", item
    assert system.get("content-type") == "application/json", item
    assert system.get("content-encoding") == "utf-8", item
    assert ev["properties"]["application"] == {"idx": str(i), "path": "a/b&c d", "eq": "x=y?z#w",
                                               "uni": "grüße €"}, item
    assert ev["payload"] == {"i": i, "tag": tag, "text": "héllo wörld"}, item


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})", pytrace=False)


def error_chain(e: BaseException) -> list[BaseException]:
    chain = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def assert_hub_error(resp, status: int, error_code: int):
    assert resp.status_code == status, f"{resp.request.method} {resp.url}: {resp.status_code} {resp.text}"
    body = resp.json()
    assert body.get("errorCode") == error_code, body
    assert body.get("message"), body
    return body


def assert_connect_refused(dev):
    out = dev.try_call("connect")
    assert out.error is not None, f"{dev.device_id}: connect() succeeded but should be refused"
    assert isinstance(out.error, CredentialError), f"{type(out.error).__name__}: {out.error!r} " \
                                                   f"(cause {out.error.__cause__!r})"
    assert out.elapsed < CONNECT_REFUSED_FAST_S, f"refusal took {out.elapsed:.1f}s"
    return out.error


def connection_state(hub, device_id: str) -> str:
    r = hub.get_device(device_id)
    assert r.status_code == 200, r.text
    return r.json()["connectionState"]


class Bystander:
    """A connected device that must stay connected and functional while others misbehave."""

    def __init__(self, server, hub_devices, primary_key: str):
        self.server = server
        self.device_id = unique("bystander")
        self.dev = connect_provisioned(server, hub_devices, primary_key, self.device_id)
        self.sent = 0
        self.send()

    def send(self):
        self.dev.send(telemetry(self.sent, "bys"))
        self.sent += 1

    def check(self):
        hub = self.server.hub_service
        assert connection_state(hub, self.device_id) == "Connected"
        self.send()
        items = hub.events(self.device_id)
        assert len(items) == self.sent, items
        for i, item in enumerate(items):
            assert_telemetry_event(item, self.device_id, i, "bys")


@pytest.fixture(scope="module")
def hub_group(service):
    """(group id, primary key) of a group whose devices start with INITIAL_TWIN."""
    gid = unique("grp-hub")
    return gid, create_group_with_twin(service, gid, INITIAL_TWIN)


# --------------------------------------------------------------------------- raw MQTT (paho)


class RawHubDevice:
    """A bare MQTT 3.1.1 connection speaking the IoT Hub device protocol, for what the SDK won't send."""

    def __init__(self, server, device_id: str, key: str):
        import paho.mqtt.client as mqtt

        self.server = server
        self.device_id = device_id
        self.connack = queue.Queue()
        self.disconnected = threading.Event()
        self.messages = queue.Queue()
        self.client = mqtt.Client(client_id=device_id, clean_session=True, protocol=mqtt.MQTTv311)
        hub = server.hub_hostname
        self.client.username_pw_set(f"{hub}/{device_id}/?api-version=2021-04-12", self._sas(hub, key))
        self.client.tls_set(ca_certs=server.ca_path, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.on_connect = lambda c, u, f, rc: self.connack.put(rc)
        self.client.on_disconnect = lambda c, u, rc: self.disconnected.set()
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))

    def _sas(self, hub: str, key: str) -> str:
        sr = urllib.parse.quote(f"{hub}/devices/{self.device_id}", safe="")
        se = int(time.time()) + 3600
        sig = base64.b64encode(hmac.new(base64.b64decode(key), f"{sr}\n{se}".encode(), hashlib.sha256).digest())
        return f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig.decode(), safe='')}&se={se}"

    def connect(self, timeout: float = 10.0) -> int:
        self.client.connect(self.server.address, MQTT_PORT, keepalive=60)
        self.client.loop_start()
        try:
            return self.connack.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"raw {self.device_id}: no CONNACK within {timeout}s", pytrace=False)

    def subscribe(self, topic: str):
        import paho.mqtt.client as mqtt

        done = threading.Event()
        self.client.on_subscribe = lambda c, u, mid, granted: done.set()
        rc, _ = self.client.subscribe(topic, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        assert done.wait(10), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes | str, qos: int = 1):
        return self.client.publish(topic, payload, qos=qos)

    def next_message(self, timeout: float = 10.0):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"raw {self.device_id}: no message within {timeout}s", pytrace=False)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def raw_devices():
    made: list[RawHubDevice] = []

    def make(server, device_id: str, key: str) -> RawHubDevice:
        d = RawHubDevice(server, device_id, key)
        made.append(d)
        return d

    yield make
    for d in made:
        try:
            d.close()
        except Exception:  # noqa: BLE001 - best effort
            pass


# --------------------------------------------------------------------------- 1. telemetry


def test_telemetry_roundtrip_with_properties(server, hub_group, hub_devices):
    _, primary = hub_group
    device_id = unique("tele")
    dev = connect_provisioned(server, hub_devices, primary, device_id)
    hub = server.hub_service
    assert hub.events(device_id) == []

    for i in range(20):
        dev.send(telemetry(i, "m"))

    # send_message() returned after the PUBACK, which the server sends once the message is stored
    items = hub.events(device_id)
    assert len(items) == 20, [it["event"]["properties"]["system"].get("message-id") for it in items]
    seqs = [it["seq"] for it in items]
    assert seqs == sorted(seqs) and len(set(seqs)) == 20, seqs
    for i, item in enumerate(items):
        assert_telemetry_event(item, device_id, i, "m")

    # the unfiltered stream holds them too, in the same order; `from` skips earlier ones
    everything = [it for it in hub.events() if it["event"]["origin"] == device_id]
    assert [it["seq"] for it in everything] == seqs
    assert [it["seq"] for it in hub.events(device_id, from_seq=seqs[10])] == seqs[10:]

    d = hub.get_device(device_id).json()
    assert d["connectionState"] == "Connected", d
    last_enqueued = parse_utc(items[-1]["event"]["annotations"]["iothub-enqueuedtime"])
    assert parse_utc(d["lastActivityTime"]) >= last_enqueued - dt.timedelta(seconds=1), d


# --------------------------------------------------------------------------- 2. initial twin


def test_initial_twin_from_enrollment_group(server, hub_group, hub_devices):
    _, primary = hub_group
    device_id = unique("twin-init")
    dev = connect_provisioned(server, hub_devices, primary, device_id)

    twin = dev.call("get_twin")
    assert set(twin) == {"desired", "reported"}, twin
    desired = dict(twin["desired"])
    assert isinstance(desired.pop("$version"), int)
    # Azure's $metadata: every desired member dated, with the desired version that wrote it.
    metadata = desired.pop("$metadata")
    assert parse_utc(metadata["interval"]["$lastUpdated"]), metadata
    assert metadata["interval"]["$lastUpdatedVersion"] == twin["desired"]["$version"], metadata
    assert desired == {"interval": 30}, twin
    assert twin["reported"].get("$version") is not None, twin
    assert {k: v for k, v in twin["reported"].items() if k not in ("$version", "$metadata")} == {}, twin

    hub = server.hub_service
    r = hub.get_twin(device_id)
    assert r.status_code == 200, r.text
    st = r.json()
    assert st["deviceId"] == device_id
    assert st["etag"], st
    assert st["tags"] == {"site": "lab"}, st
    assert st["properties"]["desired"]["interval"] == 30, st
    assert st["properties"]["desired"]["$version"] == twin["desired"]["$version"], st
    assert st["properties"]["reported"]["$version"] == twin["reported"]["$version"], st
    assert st["connectionState"] == "Connected", st

    # the device identity the hub holds: enabled, connected, keyed with the derived device key
    d = hub.get_device(device_id).json()
    assert d["deviceId"] == device_id
    assert d["status"] == "enabled"
    assert d["connectionState"] == "Connected"
    assert dev.key in (d["authentication"]["symmetricKey"]["primaryKey"],
                       d["authentication"]["symmetricKey"]["secondaryKey"]), d
    assert d["etag"] and d["generationId"], d
    assert device_id in [x["deviceId"] for x in hub.list_devices().json()]


# --------------------------------------------------------------------------- 3. reported properties


def test_reported_patch_visible_to_service(server, hub_group, hub_devices):
    _, primary = hub_group
    device_id = unique("twin-rep")
    dev = connect_provisioned(server, hub_devices, primary, device_id)
    hub = server.hub_service
    before = hub.get_twin(device_id).json()
    v0 = before["properties"]["reported"]["$version"]

    dev.call("patch_twin_reported_properties", {"temperature": 21.5, "fw": {"version": "1.2.3", "ok": True}})
    after = hub.get_twin(device_id).json()
    rep = after["properties"]["reported"]
    assert rep["$version"] == v0 + 1, after
    assert rep["temperature"] == 21.5 and rep["fw"] == {"version": "1.2.3", "ok": True}, after
    assert after["etag"] != before["etag"], after
    assert after["properties"]["desired"] == before["properties"]["desired"]

    # a second patch merges; null removes a member
    dev.call("patch_twin_reported_properties", {"fw": {"ok": None}, "mode": "eco"})
    rep = hub.get_twin(device_id).json()["properties"]["reported"]
    assert rep["$version"] == v0 + 2, rep
    assert rep["fw"] == {"version": "1.2.3"} and rep["mode"] == "eco" and rep["temperature"] == 21.5, rep

    # and the device reads the same back
    twin = dev.call("get_twin")
    assert twin["reported"] == rep, twin


# --------------------------------------------------------------------------- 4. desired properties


def test_desired_patch_reaches_device(server, hub_group, hub_devices):
    _, primary = hub_group
    device_id = unique("twin-des")
    dev = connect_provisioned(server, hub_devices, primary, device_id)
    patches = queue.Queue()
    dev.client.on_twin_desired_properties_patch_received = patches.put
    hub = server.hub_service
    etag = hub.get_twin(device_id).json()["etag"]

    r = hub.patch_twin(device_id, {"tags": {"floor": 3}, "properties": {"desired": {"interval": 60, "mode": "eco"}}},
                       if_match=etag)
    assert r.status_code == 200, r.text
    st = r.json()
    version = st["properties"]["desired"]["$version"]
    assert without_metadata(st["properties"]["desired"]) == {"interval": 60, "mode": "eco", "$version": version}, st
    assert st["tags"] == {"site": "lab", "floor": 3}, st

    try:
        got = patches.get(timeout=10)
    except queue.Empty:
        pytest.fail("desired patch not delivered to the device within 10s", pytrace=False)
    assert got == {"interval": 60, "mode": "eco", "$version": version}, got

    # a stale etag is refused and nothing is pushed
    assert_hub_error(hub.patch_twin(device_id, {"properties": {"desired": {"interval": 1}}}, if_match=etag),
                     412, 412002)
    # null removes a desired member; the device sees the null and the next version
    r = hub.patch_twin(device_id, {"properties": {"desired": {"mode": None}}})
    assert r.status_code == 200, r.text
    got = patches.get(timeout=10)
    assert got == {"mode": None, "$version": version + 1}, got
    twin = dev.call("get_twin")
    assert without_metadata(twin["desired"]) == {"interval": 60, "$version": version + 1}, twin
    assert patches.empty(), list(patches.queue)


# --------------------------------------------------------------------------- 5. direct methods


def test_direct_method_roundtrip_and_errors(server, hub_group, hub_devices):
    _, primary = hub_group
    device_id = unique("method")
    dev = connect_provisioned(server, hub_devices, primary, device_id)
    calls = []

    def on_method(req):
        calls.append((req.name, req.payload))
        if req.name == "slow":
            return  # never answers
        if req.name == "reboot":
            resp = MethodResponse.create_from_method_request(req, 200, {"echo": req.payload, "by": device_id})
        else:
            resp = MethodResponse.create_from_method_request(req, 501, {"error": f"unknown method {req.name}"})
        dev.client.send_method_response(resp)

    dev.client.on_method_request_received = on_method
    hub = server.hub_service

    r = hub.invoke_method(device_id, "reboot", {"delay": 5, "why": "a/b&c d"})
    assert r.status_code == 200, r.text
    assert r.json() == {"status": 200, "payload": {"echo": {"delay": 5, "why": "a/b&c d"}, "by": device_id}}

    r = hub.invoke_method(device_id, "nope", None)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": 501, "payload": {"error": "unknown method nope"}}
    assert calls[:2] == [("reboot", {"delay": 5, "why": "a/b&c d"}), ("nope", None)]

    # the device does not answer: 504101 after responseTimeoutInSeconds
    t0 = time.monotonic()
    assert_hub_error(hub.invoke_method(device_id, "slow", {}, response_timeout_s=5), 504, 504101)
    assert 4.5 <= time.monotonic() - t0 < 12

    # a connected device that does not listen for methods: 404103
    other_id = unique("method-deaf")
    connect_provisioned(server, hub_devices, primary, other_id)
    assert_hub_error(hub.invoke_method(other_id, "reboot", {}), 404, 404103)

    # disconnected: 404103, at once
    dev.call("disconnect")
    wait_until(lambda: connection_state(hub, device_id) == "Disconnected", 5, "Disconnected")
    t0 = time.monotonic()
    assert_hub_error(hub.invoke_method(device_id, "reboot", {}), 404, 404103)
    assert time.monotonic() - t0 < 3
    # unknown device: 404 (not found)
    r = hub.invoke_method(unique("nobody"), "reboot", {})
    assert r.status_code == 404, r.text


# --------------------------------------------------------------------------- 6. cloud-to-device


def test_c2d_queued_while_offline_is_delivered(server, hub_group, hub_devices):
    _, primary = hub_group
    device_id = unique("c2d")
    key, hub_name = provision(server, primary, device_id)
    hub = server.hub_service

    # sent before the device ever connected
    r = hub.send_c2d(device_id, '{"cmd": "on"}', message_id="c2d-1", correlation_id="corr-1",
                     content_type="application/json", content_encoding="utf-8",
                     properties={"prio": "high", "path": "a/b&c d"})
    assert r.status_code == 204, r.text

    dev = hub_devices(server, device_id, key, hub_hostname=hub_name)
    received = queue.Queue()
    dev.connect()
    dev.client.on_message_received = received.put
    try:
        msg = received.get(timeout=10)
    except queue.Empty:
        pytest.fail("queued C2D message not delivered within 10s of subscribing", pytrace=False)
    assert msg.data == b'{"cmd": "on"}', msg.data
    assert msg.message_id == "c2d-1"
    assert msg.correlation_id == "corr-1"
    assert msg.content_type == "application/json"
    assert msg.content_encoding == "utf-8"
    assert msg.custom_properties == {"prio": "high", "path": "a/b&c d"}, msg.custom_properties

    # live delivery while connected
    assert hub.send_c2d(device_id, b"live", message_id="c2d-2").status_code == 204
    msg = received.get(timeout=10)
    assert (msg.data, msg.message_id) == (b"live", "c2d-2")

    time.sleep(0.3)
    assert received.empty(), [m.message_id for m in received.queue]  # each delivered once

    # a fresh client (new subscription) after the device went offline gets what was queued meanwhile
    dev.shutdown()
    wait_until(lambda: connection_state(hub, device_id) == "Disconnected", 5, "Disconnected")
    assert hub.send_c2d(device_id, "offline again", message_id="c2d-3", properties={"n": "3"}).status_code == 204
    dev2 = hub_devices(server, device_id, key, hub_hostname=hub_name)
    received2 = queue.Queue()
    # The handler goes on before connecting, as the SDK documents: the hub keeps the session's
    # C2D subscription (CleanSession 0), so the queued message arrives right after CONNACK.
    dev2.client.on_message_received = received2.put
    dev2.connect()
    msg = received2.get(timeout=10)
    assert (msg.data, msg.message_id, msg.custom_properties) == (b"offline again", "c2d-3", {"n": "3"})
    time.sleep(0.3)
    assert received.empty() and received2.empty()

    # an unknown device gets 404, and the queue of a device that never connects holds 50 messages
    assert hub.send_c2d(unique("nobody"), b"x").status_code == 404
    idle_id = unique("c2d-idle")
    provision(server, primary, idle_id)
    for i in range(50):
        r = hub.send_c2d(idle_id, f"m{i}")
        assert r.status_code == 204, f"message {i}: {r.status_code} {r.text}"
    assert_hub_error(hub.send_c2d(idle_id, "one too many"), 403, 403004)


def test_device_id_with_every_symbol_azure_allows(server, hub_devices):
    """Issue 14 item 1: the SDK puts such an id unencoded in the MQTT username and topics and
    (percent-encoded with the rest of it) in the SAS sr, and matches C2D topics on the unencoded
    id; the service API takes it percent-encoded in the path."""
    device_id = unique("id") + "-.%_*?!(),:=@$'"
    key = random_key()
    hub = server.hub_service
    r = hub.put_device(device_id, {"deviceId": device_id,
                                   "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key}}})
    assert r.status_code == 200, r.text
    assert r.json()["deviceId"] == device_id
    dev = hub_devices(server, device_id, key)
    received = queue.Queue()
    dev.connect()
    dev.client.on_message_received = received.put
    dev.send(Message("from a device with symbols"))
    wait_until(lambda: any(e["event"]["origin"] == device_id for e in hub.events(device_id)), 5, "telemetry stored")
    assert hub.send_c2d(device_id, b"to it", message_id="sym-1").status_code == 204
    msg = received.get(timeout=10)
    assert (msg.data, msg.message_id) == (b"to it", "sym-1")
    dev.call("patch_twin_reported_properties", {"ok": True})
    assert hub.get_twin(device_id).json()["properties"]["reported"]["ok"] is True


# The SDK connects with CleanSession=0 and does not subscribe again after reconnecting: it relies on
# the hub keeping the session's subscriptions (and Fleetgate keeps them, across restarts too).


def test_c2d_sent_after_disconnect_is_delivered_on_reconnect(server, hub_group, hub_devices):
    _, primary = hub_group
    device_id = unique("c2d-reconn")
    dev = connect_provisioned(server, hub_devices, primary, device_id)
    received = queue.Queue()
    dev.client.on_message_received = received.put
    hub = server.hub_service
    assert hub.send_c2d(device_id, b"first", message_id="c2d-a").status_code == 204
    assert received.get(timeout=10).message_id == "c2d-a"

    dev.call("disconnect")
    wait_until(lambda: connection_state(hub, device_id) == "Disconnected", 5, "Disconnected")
    assert hub.send_c2d(device_id, "offline", message_id="c2d-b", properties={"n": "2"}).status_code == 204
    dev.connect()
    try:
        msg = received.get(timeout=5)
    except queue.Empty:
        pytest.fail("C2D message sent while disconnected was not delivered within 5s of connect()", pytrace=False)
    assert (msg.data, msg.message_id, msg.custom_properties) == (b"offline", "c2d-b", {"n": "2"})


def test_direct_method_after_reconnect(server, hub_group, hub_devices):
    _, primary = hub_group
    device_id = unique("method-reconn")
    dev = connect_provisioned(server, hub_devices, primary, device_id)
    dev.client.on_method_request_received = lambda req: dev.client.send_method_response(
        MethodResponse.create_from_method_request(req, 200, {"ok": True}))
    hub = server.hub_service
    assert hub.invoke_method(device_id, "ping").json() == {"status": 200, "payload": {"ok": True}}

    dev.call("disconnect")
    wait_until(lambda: connection_state(hub, device_id) == "Disconnected", 5, "Disconnected")
    dev.connect()
    r = hub.invoke_method(device_id, "ping")
    assert r.status_code == 200, f"after reconnect: {r.status_code} {r.text}"
    assert r.json() == {"status": 200, "payload": {"ok": True}}


# --------------------------------------------------------------------------- 7. negative cases


def test_refused_connects_and_bad_patches_leave_others_alone(server, hub_group, hub_devices):
    _, primary = hub_group
    bystander = Bystander(server, hub_devices, primary)
    hub = server.hub_service

    # wrong key for a provisioned device; any key for a device that does not exist
    device_id = unique("neg-key")
    key, _ = provision(server, primary, device_id)
    assert_connect_refused(hub_devices(server, device_id, random_key()))
    assert_connect_refused(hub_devices(server, unique("neg-unknown"), random_key()))
    # the refusals did not disturb the real device's identity
    assert hub.get_device(device_id).json()["status"] == "enabled"

    # disabling a connected device closes its connection and refuses new ones
    victim = hub_devices(server, device_id, key)
    victim.connect()
    assert connection_state(hub, device_id) == "Connected"
    assert_hub_error(hub.put_device(device_id, {"deviceId": device_id, "status": "disabled"}), 409, 409001)
    r = hub.put_device(device_id, {"deviceId": device_id, "status": "disabled"}, if_match="*")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "disabled", r.json()
    wait_until(lambda: connection_state(hub, device_id) == "Disconnected", 5, "the disabled device's disconnect")
    victim.shutdown()  # it would keep retrying in the background
    assert_connect_refused(hub_devices(server, device_id, key))
    assert hub.get_device(device_id).json()["status"] == "disabled"
    # re-enabled (etag-checked): the same key works again, so the refusal was the disable
    etag = hub.get_device(device_id).json()["etag"]
    assert_hub_error(hub.put_device(device_id, {"deviceId": device_id, "status": "enabled"}, if_match='"stale"'),
                     412, 412002)
    r = hub.put_device(device_id, {"deviceId": device_id, "status": "enabled"}, if_match=etag)
    assert r.status_code == 200, r.text
    again = hub_devices(server, device_id, key)
    again.connect()

    # reported patches the hub refuses (400): the SDK raises; the connection stays usable
    before = hub.get_twin(device_id).json()["properties"]["reported"]
    for bad in ({"bad.key": 1}, {"nested": {"$dollar": 1}}, {"has space": 1}):
        out = again.try_call("patch_twin_reported_properties", bad)
        assert out.error is not None, f"patch {bad} was accepted"
        assert isinstance(out.error, ClientError), repr(out.error)
        chain = error_chain(out.error)
        assert any(isinstance(e, ServiceError) and "400" in str(e) for e in chain), chain
    assert hub.get_twin(device_id).json()["properties"]["reported"] == before
    again.call("patch_twin_reported_properties", {"good": 1})
    rep = hub.get_twin(device_id).json()["properties"]["reported"]
    assert rep["good"] == 1 and rep["$version"] == before["$version"] + 1, rep

    bystander.check()


def test_protocol_violations_close_only_that_connection(server, hub_group, hub_devices, raw_devices):
    _, primary = hub_group
    bystander = Bystander(server, hub_devices, primary)
    hub = server.hub_service
    device_id = unique("raw")
    key, _ = provision(server, primary, device_id)

    # CONNACK 5 (not authorized) for a wrong key, with no session
    bad = raw_devices(server, device_id, random_key())
    assert bad.connect() == 5
    assert bad.disconnected.wait(5)

    # reported patch that is not JSON: twin response 400 with errorCode 400004; connection stays
    raw = raw_devices(server, device_id, key)
    assert raw.connect() == 0
    raw.subscribe("$iothub/twin/res/#")
    raw.publish("$iothub/twin/PATCH/properties/reported/?$rid=7", b"{not json")
    topic, body = raw.next_message()
    assert topic.startswith("$iothub/twin/res/400/"), topic
    assert "$rid=7" in topic, topic
    err = json.loads(body)
    assert err["errorCode"] == 400004 and err["message"], err
    raw.publish("$iothub/twin/GET/?$rid=8", b"")
    topic, body = raw.next_message()
    assert topic.startswith("$iothub/twin/res/200/") and "$rid=8" in topic, topic
    assert json.loads(body)["desired"]["interval"] == 30
    assert not raw.disconnected.is_set()

    # telemetry into another device's topic: the server closes this connection
    raw.publish(f"devices/{bystander.device_id}/messages/events/", b"spoofed")
    assert raw.disconnected.wait(5), "publishing to another device's topic did not close the connection"

    # an unknown topic: closed as well
    raw2 = raw_devices(server, device_id, key)
    assert raw2.connect() == 0
    raw2.publish(f"devices/{device_id}/nonsense", b"x")
    assert raw2.disconnected.wait(5), "publishing to an unknown topic did not close the connection"

    # telemetry over 256 KB: closed, nothing stored
    raw3 = raw_devices(server, device_id, key)
    assert raw3.connect() == 0
    raw3.publish(f"devices/{device_id}/messages/events/", b"x" * (256 * 1024 + 1))
    assert raw3.disconnected.wait(10), "a 256 KB+ message did not close the connection"
    assert hub.events(device_id) == []

    # a normal message on a fresh connection still works
    raw4 = raw_devices(server, device_id, key)
    assert raw4.connect() == 0
    info = raw4.publish(f"devices/{device_id}/messages/events/%24.mid=ok-1", b'{"ok": true}')
    info.wait_for_publish(5)
    assert info.is_published()
    items = hub.events(device_id)
    assert [(it["event"]["properties"]["system"].get("message-id"), it["event"]["payload"]) for it in items] \
        == [("ok-1", {"ok": True})], items

    # no spoofed message reached the bystander's stream, and it is still fine
    assert all(it["event"]["payload"] != "spoofed" for it in hub.events(bystander.device_id))
    bystander.check()


# --------------------------------------------------------------------------- 8. restart


def test_restart_keeps_acknowledged_telemetry(server, server_factory, hub_devices):
    srv = server_factory("hub-restart").start()
    gid = unique("grp-hub-restart")
    primary = create_group_with_twin(srv.service, gid, INITIAL_TWIN)
    device_id = unique("restart-dev")
    dev = connect_provisioned(srv, hub_devices, primary, device_id)
    for i in range(5):
        dev.send(telemetry(i, "r"))
    dev.call("patch_twin_reported_properties", {"beforeRestart": True})

    assert srv.stop() == 0, f"unclean shutdown\n{srv.log_tail()}"
    srv.start()
    hub = srv.hub_service

    items = hub.events(device_id)
    assert len(items) == 5, items
    for i, item in enumerate(items):
        assert_telemetry_event(item, device_id, i, "r")
    assert hub.get_twin(device_id).json()["properties"]["reported"]["beforeRestart"] is True

    # the SDK reconnects on its own (connection_retry_interval=1) and carries on
    wait_until(lambda: connection_state(hub, device_id) == "Connected", 15, "the SDK's reconnect")
    dev.send(telemetry(5, "r"))
    items = hub.events(device_id)
    assert len(items) == 6, items
    assert_telemetry_event(items[5], device_id, 5, "r")
    assert items[5]["seq"] > items[4]["seq"]
    assert dev.call("get_twin")["reported"]["beforeRestart"] is True
