"""DPS beyond a single static hub, end to end with the Azure IoT Python device SDK (2.14.0).

Individual enrollments (and their precedence over groups), weighted hashed allocation over three
linked hubs, custom allocation webhooks with device payloads, the reprovisioning policies (with
the identity and its twin moving between hubs), and enable/disable/delete semantics.

One Fleetgate server (module scope) links three hubs: its default hub plus two added with
`fleetgate hub create` while it runs. Devices always dial the server's own loopback address; the
hub a device is on is told apart by the hub name in its credentials and in the hub service API's
SAS token.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from azure.iot.device.exceptions import ClientError, ServiceError

from conftest import (
    REGISTER_TIMEOUT_S,
    EnrollmentServiceApi,
    derive_device_key,
    hub_service_for,
    parse_utc,
    random_key,
    register_device_with,
    reload_instance,
    run_cli,
    unique,
)

HUB_B = "hub-b.fleetgate.test"
HUB_C = "hub-c.fleetgate.test"
API = "2021-10-01"
FAIL_FAST_S = 20.0  # a refused or failed registration must surface well within this
WEBHOOK_SLOW_S = 12.0  # beyond the server's 10 s webhook timeout


# --------------------------------------------------------------------------- the fleet


class Fleet:
    """The module's server with its three linked hubs and API clients."""

    def __init__(self, server):
        self.server = server
        self.svc = EnrollmentServiceApi.of(server)
        self.hub_a = server.hub_hostname  # the instance's default hub
        self.hubs = [self.hub_a, HUB_B, HUB_C]
        self._hub_apis = {}

    def hub(self, name: str):
        if name not in self._hub_apis:
            self._hub_apis[name] = hub_service_for(self.server, name)
        return self._hub_apis[name]

    def register(self, registration_id: str, key: str, payload=None, timeout: float = REGISTER_TIMEOUT_S):
        s = self.server
        return register_device_with(s.address, s.id_scope, s.ca_pem, registration_id, key, payload=payload,
                                    timeout=timeout)

    def hubs_holding(self, device_id: str) -> list[str]:
        """The hubs whose service API knows the device (each answer must be 200 or 404)."""
        found = []
        for name in self.hubs:
            r = self.hub(name).get_device(device_id)
            assert r.status_code in (200, 404), f"{name} GET /devices/{device_id}: {r.status_code} {r.text}"
            if r.status_code == 200:
                found.append(name)
        return found

    def twin(self, hub: str, device_id: str) -> dict:
        r = self.hub(hub).get_twin(device_id)
        assert r.status_code == 200, f"{hub} GET /twins/{device_id}: {r.status_code} {r.text}"
        return r.json()


@pytest.fixture(scope="module")
def fleet(server, server_factory) -> Fleet:
    # `server` first, so the session's main server keeps 127.0.0.1 (as test_provisioning does);
    # a server of its own because linking hubs changes where the main server's groups allocate.
    srv = server_factory("breadth").start()
    for name in (HUB_B, HUB_C):
        out = run_cli(srv, "hub", "create", "--hostname", name)
        assert name in out.stdout, out.stdout
    hubs = [h["hostName"] for h in reload_instance(srv)["hubs"]]
    assert hubs == [srv.hub_hostname, HUB_B, HUB_C], hubs
    return Fleet(srv)


# --------------------------------------------------------------------------- helpers


def sym_attestation(primary: str | None = None, secondary: str | None = None) -> dict:
    keys = {}
    if primary:
        keys["primaryKey"] = primary
    if secondary:
        keys["secondaryKey"] = secondary
    return {"type": "symmetricKey", "symmetricKey": keys}


def put_group(fleet: Fleet, **fields) -> tuple[str, dict]:
    """A new enabled group with the given settings; returns (group id, the PUT answer with keys)."""
    gid = fields.pop("enrollmentGroupId", None) or unique("grp")
    body = {"enrollmentGroupId": gid, "attestation": sym_attestation(), "provisioningStatus": "enabled", **fields}
    r = fleet.svc.put_group_body(body)
    assert r.status_code == 200, f"PUT /enrollmentGroups/{gid}: {r.status_code} {r.text}"
    got = r.json()
    assert got["attestation"]["symmetricKey"]["primaryKey"], got
    return gid, got


def put_enrollment(fleet: Fleet, registration_id: str, etag: str | None = None, **fields) -> dict:
    body = {"registrationId": registration_id, "attestation": sym_attestation(), "provisioningStatus": "enabled",
            **fields}
    r = fleet.svc.put_enrollment(body, etag=etag)
    assert r.status_code == 200, f"PUT /enrollments/{registration_id}: {r.status_code} {r.text}"
    return r.json()


def update_via_get(fleet: Fleet, kind: str, ident: str, **changes) -> dict:
    """GET the group/enrollment (keys hidden), change fields, PUT it back with If-Match: *."""
    if kind == "group":
        r = fleet.svc.get_group(ident)
    else:
        r = fleet.svc.get_enrollment(ident)
    assert r.status_code == 200, r.text
    body = r.json()
    body.pop("registrationState", None)
    body.update(changes)
    r = fleet.svc.put_group_body(body, etag="*") if kind == "group" else fleet.svc.put_enrollment(body, etag="*")
    assert r.status_code == 200, f"PUT {kind} {ident} (If-Match: *): {r.status_code} {r.text}"
    for name, value in changes.items():
        assert r.json().get(name) == value, (name, r.json())
    return r.json()


def describe(out) -> str:
    if out.error is None:
        return f"result {out.result}"
    return f"{type(out.error).__name__}: {out.error!r} (cause {out.error.__cause__!r})"


def assert_assigned(out, registration_id: str, *, hub: str | None = None, device_id: str | None = None,
                    sub_status: str | None = "initialAssignment"):
    assert out.error is None, f"register({registration_id!r}) raised: {describe(out)}"
    res = out.result
    assert res.status == "assigned", res
    st = res.registration_state
    assert st is not None, res
    if hub is not None:
        assert st.assigned_hub == hub, (registration_id, st.assigned_hub, hub)
    assert st.device_id == (device_id or registration_id), st
    if sub_status is not None:
        assert st.sub_status == sub_status, (registration_id, st.sub_status)
    return st


def sdk_failure(out) -> str:
    """register() failed fast with ClientError caused by a ServiceError; returns the cause's text."""
    assert out.result is None, f"expected a failure, got {out.result}"
    assert out.error is not None
    assert out.elapsed < FAIL_FAST_S, f"failure took {out.elapsed:.1f}s"
    assert type(out.error) is ClientError, describe(out)
    cause = out.error.__cause__
    assert isinstance(cause, ServiceError), describe(out)
    msg = str(cause)
    assert "timed out" not in msg, msg  # the SDK's own 30 s timeout would also be a ServiceError
    return msg


def record(fleet: Fleet, registration_id: str) -> dict:
    r = fleet.svc.get_registration(registration_id)
    assert r.status_code == 200, f"GET /registrations/{registration_id}: {r.status_code} {r.text}"
    return r.json()


def record_absent(fleet: Fleet, registration_id: str):
    r = fleet.svc.get_registration(registration_id)
    assert r.status_code == 404, f"GET /registrations/{registration_id}: {r.status_code} {r.text}"
    assert r.json().get("errorCode") == 404201, r.text


def find_keys(value, path="$"):
    """Every non-empty primaryKey/secondaryKey member anywhere in a JSON value."""
    hits = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k.lower() in ("primarykey", "secondarykey") and v:
                hits.append(f"{path}.{k}")
            hits.extend(find_keys(v, f"{path}.{k}"))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            hits.extend(find_keys(v, f"{path}[{i}]"))
    return hits


# --------------------------------------------------------------------------- 1. individual enrollment precedence


def test_individual_enrollment_takes_precedence_over_group(fleet, hub_devices):
    svc = fleet.svc
    # The group sends everyone to the default hub; the individual enrollment names hub B.
    gid, group = put_group(fleet, iotHubHostName=fleet.hub_a, allocationPolicy="static")
    group_primary = group["attestation"]["symmetricKey"]["primaryKey"]
    rid, device_id = "ind-1", "custom-ind-1"
    created = put_enrollment(fleet, rid, deviceId=device_id, iotHubHostName=HUB_B, allocationPolicy="static",
                             initialTwin={"tags": {"kind": "individual"}})
    assert created["registrationId"] == rid and created["deviceId"] == device_id, created
    keys = created["attestation"]["symmetricKey"]
    primary, secondary = keys.get("primaryKey"), keys.get("secondaryKey")
    assert primary and secondary and primary != secondary, created

    # control: the group itself works for another registration id
    sibling = unique("ind-sibling")
    assert_assigned(fleet.register(sibling, derive_device_key(group_primary, sibling)), sibling, hub=fleet.hub_a)

    # the group-derived key no longer opens registration for ind-1
    out = fleet.register(rid, derive_device_key(group_primary, rid))
    assert sdk_failure(out) == "register request returned a service error status code 401"
    record_absent(fleet, rid)

    # the enrollment's own primary key does: its device id, its hub, its initial twin
    st = assert_assigned(fleet.register(rid, primary), rid, hub=HUB_B, device_id=device_id)
    first_created = st.created_date_time
    # ... and so does its secondary key, for the same assignment
    st2 = assert_assigned(fleet.register(rid, secondary), rid, hub=HUB_B, device_id=device_id, sub_status=None)
    assert st2.created_date_time == first_created

    assert fleet.hubs_holding(device_id) == [HUB_B]
    assert fleet.hubs_holding(rid) == [], "no identity under the registration id"
    assert fleet.twin(HUB_B, device_id)["tags"] == {"kind": "individual"}
    # the hub identity carries the enrollment's keys: the device connects with them
    for key in (primary, secondary):
        dev = hub_devices(fleet.server, device_id, key, hub_hostname=HUB_B)
        dev.connect()
        twin = dev.call("get_twin")
        assert "desired" in twin, twin
        dev.shutdown()

    # GET shows the registration state and hides the keys
    r = svc.get_enrollment(rid)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["registrationId"] == rid and got["deviceId"] == device_id, got
    assert not find_keys(got), got
    rs = got.get("registrationState")
    assert rs, f"GET /enrollments/{rid} has no registrationState: {got}"
    assert rs["registrationId"] == rid, rs
    assert rs["deviceId"] == device_id, rs
    assert rs["assignedHub"] == HUB_B, rs
    assert rs["status"] == "assigned", rs
    assert rs["createdDateTimeUtc"] == first_created, rs
    assert "enrollmentGroupId" not in rs or not rs["enrollmentGroupId"], rs
    # the record is the enrollment's, not the group's
    assert rid not in [x["registrationId"] for x in svc.query_registrations(gid)[0]]
    r = svc.query_enrollments()
    assert r.status_code == 200, r.text
    assert rid in [e["registrationId"] for e in r.json()], r.json()
    assert not find_keys(r.json())


def test_bulk_enrollments_register_with_their_own_keys(fleet):
    svc = fleet.svc
    tag = unique("bulk")
    ids = [f"{tag}-{i}" for i in range(3)]
    keys = {rid: random_key() for rid in ids}
    items = [{"registrationId": rid, "attestation": sym_attestation(keys[rid], random_key()),
              "iotHubHostName": HUB_C, "allocationPolicy": "static"} for rid in ids]
    r = svc.bulk_enrollments("create", items)
    assert r.status_code == 200, r.text
    assert r.json() == {"isSuccessful": True, "errors": []}, r.json()
    # creating one again fails for that one only, and reports why
    r = svc.bulk_enrollments("create", [items[0], {"registrationId": f"{tag}-new",
                                                   "attestation": sym_attestation(random_key(), random_key())}])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["isSuccessful"] is False, body
    assert [(e["registrationId"], e["errorCode"]) for e in body["errors"]] == [(ids[0], 409201)], body
    # more than 10 at once is refused outright
    r = svc.bulk_enrollments("create", [{"registrationId": f"{tag}-x{i}", "attestation": sym_attestation()}
                                        for i in range(11)])
    assert r.status_code == 400, r.text

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        outs = dict(zip(ids, pool.map(lambda rid: fleet.register(rid, keys[rid]), ids)))
    for rid in ids:
        assert_assigned(outs[rid], rid, hub=HUB_C)

    # updateIfMatchETag: the current etag updates, the stale one is refused per item
    current = svc.get_enrollment(ids[1]).json()
    current.pop("registrationState", None)
    current["provisioningStatus"] = "disabled"
    r = svc.bulk_enrollments("updateIfMatchETag", [current])
    assert r.json() == {"isSuccessful": True, "errors": []}, r.json()
    r = svc.bulk_enrollments("updateIfMatchETag", [current])
    assert [(e["registrationId"], e["errorCode"]) for e in r.json()["errors"]] == [(ids[1], 412002)], r.json()
    assert svc.get_enrollment(ids[1]).json()["provisioningStatus"] == "disabled"
    assert "invalid registration status disabled" in sdk_failure(fleet.register(ids[1], keys[ids[1]]))

    r = svc.bulk_enrollments("delete", [{"registrationId": ids[0]}, {"registrationId": f"{tag}-missing"}])
    assert r.status_code == 200, r.text
    assert [e["registrationId"] for e in r.json()["errors"]] == [f"{tag}-missing"], r.json()
    assert svc.get_enrollment(ids[0]).status_code == 404
    # without its enrollment (and no group for it), the device is refused
    assert sdk_failure(fleet.register(ids[0], keys[ids[0]])) == \
        "register request returned a service error status code 401"


# --------------------------------------------------------------------------- 2. weighted hashed allocation


def test_hashed_allocation_follows_linked_hub_weights(fleet):
    srv = fleet.server
    for name, weight in ((fleet.hub_a, 1), (HUB_B, 1), (HUB_C, 2)):
        run_cli(srv, "linked-hub", "update", "--hostname", name, "--allocation-weight", str(weight))
    listing = {h["name"]: h for h in json.loads(run_cli(srv, "linked-hub", "list").stdout)}
    assert {n: (h["allocationWeight"], h["applyAllocationPolicy"]) for n, h in listing.items()} == \
        {fleet.hub_a: (1, True), HUB_B: (1, True), HUB_C: (2, True)}, listing

    gid, group = put_group(fleet, allocationPolicy="hashed")
    primary = group["attestation"]["symmetricKey"]["primaryKey"]
    # fixed ids: hashed allocation is deterministic per registration id, so is this test
    rids = [f"hashed-{i:03d}" for i in range(400)]
    ca_pem = srv.ca_pem

    def one(rid):
        return register_device_with(srv.address, srv.id_scope, ca_pem, rid, derive_device_key(primary, rid),
                                    timeout=60)

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        outs = dict(zip(rids, pool.map(one, rids)))
    print(f"400 registrations in {time.monotonic() - t0:.1f}s")
    assigned = {rid: assert_assigned(outs[rid], rid).assigned_hub for rid in rids}
    counts = Counter(assigned.values())
    expected = {fleet.hub_a: 100, HUB_B: 100, HUB_C: 200}
    print(f"hashed allocation: {dict(counts)}")
    assert set(counts) == set(expected), counts
    for hub, want in expected.items():
        assert abs(counts[hub] - want) <= 0.15 * want, f"{hub}: {counts[hub]} devices, expected {want} ±15%: {counts}"

    # the service's records agree with what the devices were told
    records, _ = fleet.svc.query_registrations(gid, page_size=100)
    assert {r["registrationId"]: r["assignedHub"] for r in records} == assigned
    # identities exist on the assigned hub only (a sample per hub)
    for hub in expected:
        for rid in [r for r, h in assigned.items() if h == hub][:3]:
            assert fleet.hubs_holding(rid) == [hub], rid
    # deterministic: registering again keeps every sampled device where it was
    sample = [next(r for r, h in assigned.items() if h == hub) for hub in expected]
    for rid in sample:
        st = assert_assigned(one(rid), rid, sub_status=None)
        assert st.assigned_hub == assigned[rid], rid


def test_hashed_allocation_honours_iot_hubs_and_apply_allocation_policy(fleet):
    srv = fleet.server
    # an enrollment's own iotHubs list limits the pool
    _, group = put_group(fleet, allocationPolicy="hashed", iotHubs=[HUB_B, HUB_C])
    primary = group["attestation"]["symmetricKey"]["primaryKey"]
    rids = [f"subset-{i:02d}" for i in range(30)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        outs = list(pool.map(lambda rid: fleet.register(rid, derive_device_key(primary, rid)), rids))
    counts = Counter(assert_assigned(o, rid).assigned_hub for o, rid in zip(outs, rids))
    assert set(counts) == {HUB_B, HUB_C}, counts

    # a hub that does not apply allocation policies takes no devices from enrollments without iotHubs
    run_cli(srv, "linked-hub", "update", "--hostname", HUB_C, "--apply-allocation-policy", "false")
    try:
        _, group2 = put_group(fleet, allocationPolicy="hashed")
        p2 = group2["attestation"]["symmetricKey"]["primaryKey"]
        rids2 = [f"noapply-{i:02d}" for i in range(30)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            outs2 = list(pool.map(lambda rid: fleet.register(rid, derive_device_key(p2, rid)), rids2))
        counts2 = Counter(assert_assigned(o, rid).assigned_hub for o, rid in zip(outs2, rids2))
        assert set(counts2) == {fleet.hub_a, HUB_B}, counts2
    finally:
        run_cli(srv, "linked-hub", "update", "--hostname", HUB_C, "--apply-allocation-policy", "true")


def test_geo_latency_allocation_picks_the_lowest_latency_hub(fleet):
    srv = fleet.server
    latencies = {fleet.hub_a: 40, HUB_B: 25, HUB_C: 5}
    try:
        for name, ms in latencies.items():
            run_cli(srv, "linked-hub", "update", "--hostname", name, "--latency-ms", str(ms))
        _, group = put_group(fleet, allocationPolicy="geoLatency")
        primary = group["attestation"]["symmetricKey"]["primaryKey"]
        rids = [f"geo-{i:02d}" for i in range(8)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            outs = list(pool.map(lambda rid: fleet.register(rid, derive_device_key(primary, rid)), rids))
        assert {assert_assigned(o, rid).assigned_hub for o, rid in zip(outs, rids)} == {HUB_C}
        # an enrollment's iotHubs list narrows the choice to the nearest of those
        _, group2 = put_group(fleet, allocationPolicy="geoLatency", iotHubs=[fleet.hub_a, HUB_B])
        rid = "geo-subset"
        out = fleet.register(rid, derive_device_key(group2["attestation"]["symmetricKey"]["primaryKey"], rid))
        assert_assigned(out, rid, hub=HUB_B)
    finally:
        for name in latencies:
            run_cli(srv, "linked-hub", "update", "--hostname", name, "--latency-ms", "0")


# --------------------------------------------------------------------------- 3. custom allocation webhook


class Webhook:
    """An allocation webhook on 127.0.0.1: routes by the device payload's `tier`.

    gold -> hub B, slow -> answers after WEBHOOK_SLOW_S, broken -> HTTP 500, rogue -> a hub that is
    not linked, garbage -> an answer without iotHubHostName, anything else -> the instance's default hub. Successful answers carry a payload and
    an initial twin.
    """

    def __init__(self, default_hub: str):
        self.requests: list[dict] = []
        self.raw: list[bytes] = []
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    req = json.loads(raw)
                except ValueError:
                    req = {"unparsable": raw.decode(errors="replace")}
                with hook.lock:
                    hook.raw.append(raw)
                    hook.requests.append({"path": self.path, "body": req,
                                          "content_type": self.headers.get("Content-Type")})
                payload = (req.get("deviceRuntimeContext") or {}).get("payload") or {}
                tier = payload.get("tier", "") if isinstance(payload, dict) else ""
                if tier == "broken":
                    return self._answer(500, {"error": "boom"})
                if tier == "slow":
                    time.sleep(WEBHOOK_SLOW_S)
                    return self._answer(200, {"iotHubHostName": HUB_B})
                if tier == "rogue":
                    return self._answer(200, {"iotHubHostName": "elsewhere.example"})
                if tier == "garbage":
                    return self._answer(200, {"hub": HUB_B})  # no iotHubHostName
                hub = HUB_B if tier == "gold" else default_hub
                return self._answer(200, {"iotHubHostName": hub,
                                          "initialTwin": {"tags": {"tier": tier or "none"}},
                                          "payload": {"routedBy": "webhook", "tier": tier or "none"}})

            def _answer(self, status, body):
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the server gave up waiting (slow case)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/alloc?code=secret"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="webhook", daemon=True)
        self.thread.start()

    def requests_for(self, registration_id: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests
                    if (r["body"].get("deviceRuntimeContext") or {}).get("registrationId") == registration_id]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def webhook(fleet):
    hook = Webhook(fleet.hub_a)
    yield hook
    hook.close()


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/alloc"


def test_custom_allocation_webhook_routes_by_payload(fleet, webhook):
    custom = {"allocationPolicy": "custom", "customAllocationDefinition": {"webhookUrl": webhook.url, "apiVersion": API}}
    gid, group = put_group(fleet, **custom)
    gkeys = group["attestation"]["symmetricKey"]
    _, down_group = put_group(fleet, allocationPolicy="custom",
                                     customAllocationDefinition={"webhookUrl": closed_port_url(), "apiVersion": API})
    tag = gid.rsplit("-", 1)[1]
    ind_rid = f"cust-ind-{tag}"
    ind = put_enrollment(fleet, ind_rid, **custom)
    ind_key = ind["attestation"]["symmetricKey"]["primaryKey"]

    # (registration id, key, payload)
    cases = {
        "gold": (f"cust-gold-{tag}", derive_device_key(gkeys["primaryKey"], f"cust-gold-{tag}"),
                 {"tier": "gold", "fw": "1.0.3", "modelId": "dtmi:fleetgate:thermo;1"}),
        "basic": (f"cust-basic-{tag}", derive_device_key(gkeys["secondaryKey"], f"cust-basic-{tag}"),
                  {"tier": "basic"}),
        "individual": (ind_rid, ind_key, {"tier": "gold"}),
        "down": (f"cust-down-{tag}",
                 derive_device_key(down_group["attestation"]["symmetricKey"]["primaryKey"], f"cust-down-{tag}"),
                 {"tier": "gold"}),
        "broken": (f"cust-broken-{tag}", derive_device_key(gkeys["primaryKey"], f"cust-broken-{tag}"),
                   {"tier": "broken"}),
        "rogue": (f"cust-rogue-{tag}", derive_device_key(gkeys["primaryKey"], f"cust-rogue-{tag}"),
                  {"tier": "rogue"}),
        "slow": (f"cust-slow-{tag}", derive_device_key(gkeys["primaryKey"], f"cust-slow-{tag}"),
                 {"tier": "slow"}),
        "garbage": (f"cust-garbage-{tag}", derive_device_key(gkeys["primaryKey"], f"cust-garbage-{tag}"),
                    {"tier": "garbage"}),
    }
    # each custom allocation costs the SDK >= 2 s of polling: run them side by side
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futs = {name: pool.submit(fleet.register, rid, key, payload, FAIL_FAST_S + 5)
                for name, (rid, key, payload) in cases.items()}
        outs = {name: f.result() for name, f in futs.items()}
    print(f"custom allocations in {time.monotonic() - t0:.1f}s: "
          + ", ".join(f"{n}={o.elapsed:.1f}s" for n, o in outs.items()))

    # ---- successes: routed by payload, returned payload reaches the device, webhook's twin applies
    for name, hub, tier in (("gold", HUB_B, "gold"), ("basic", fleet.hub_a, "basic"), ("individual", HUB_B, "gold")):
        rid, _, payload = cases[name]
        st = assert_assigned(outs[name], rid, hub=hub)
        assert json.loads(st.response_payload) == {"routedBy": "webhook", "tier": tier}, (name, st.response_payload)
        assert fleet.hubs_holding(rid) == [hub], name
        assert fleet.twin(hub, rid)["tags"] == {"tier": tier}, name
        rec = record(fleet, rid)
        assert rec["status"] == "assigned" and rec["assignedHub"] == hub, rec
        assert rec.get("payload") == {"routedBy": "webhook", "tier": tier}, rec

        # the webhook saw the device's payload and context, and no key material
        seen = webhook.requests_for(rid)
        assert len(seen) == 1, seen
        req = seen[0]["body"]
        assert seen[0]["content_type"].startswith("application/json"), seen[0]
        ctx = req["deviceRuntimeContext"]
        assert ctx["registrationId"] == rid, ctx
        assert ctx["payload"] == payload, ctx
        assert ctx.get("symmetricKey") == {}, ctx
        assert "currentIotHubHostName" not in ctx, ctx  # first registration
        assert sorted(req["linkedHubs"]) == sorted(fleet.hubs), req["linkedHubs"]
        if name == "individual":
            assert req["individualEnrollment"]["registrationId"] == rid, req
            assert "enrollmentGroup" not in req, req
        else:
            assert req["enrollmentGroup"]["enrollmentGroupId"] == gid, req
            assert req["enrollmentGroup"]["allocationPolicy"] == "custom", req
            assert "individualEnrollment" not in req, req
        assert not find_keys(req), find_keys(req)
        raw = b"".join(webhook.raw)
        for secret in (gkeys["primaryKey"], gkeys["secondaryKey"], ind_key, cases[name][1]):
            assert secret.encode() not in raw, "a key reached the webhook"

    # ---- failures: the device is told quickly, the record says why, no identity anywhere
    for name, code, why in (("down", 400210, "could not be reached"), ("broken", 400210, "HTTP 500"),
                            ("rogue", 400209, "elsewhere.example"), ("slow", 400210, "timed out"),
                            ("garbage", 400210, "iotHubHostName")):
        rid = cases[name][0]
        msg = sdk_failure(outs[name])
        assert "failed registration status" in msg, (name, msg)
        rec = record(fleet, rid)
        assert rec["status"] == "failed", (name, rec)
        assert rec.get("errorCode") == code, (name, rec)
        assert why in (rec.get("errorMessage") or ""), (name, rec)
        assert fleet.hubs_holding(rid) == [], name
        if name != "down":
            assert len(webhook.requests_for(rid)) == 1, (name, webhook.requests_for(rid))
    assert outs["slow"].elapsed >= 9, "the slow webhook cannot have been waited for"

    # ---- re-registration: the webhook learns where the device is, and may move it (the group's
    # default reprovision policy migrates the data)
    rid, key, _ = cases["gold"]
    st = assert_assigned(fleet.register(rid, key, {"tier": "basic"}), rid, hub=fleet.hub_a,
                         sub_status="deviceDataMigrated")
    assert json.loads(st.response_payload) == {"routedBy": "webhook", "tier": "basic"}, st.response_payload
    seen = webhook.requests_for(rid)
    assert len(seen) == 2, seen
    ctx = seen[1]["body"]["deviceRuntimeContext"]
    assert ctx.get("currentIotHubHostName") == HUB_B and ctx.get("currentDeviceId") == rid, ctx
    assert ctx["payload"] == {"tier": "basic"}, ctx
    assert fleet.hubs_holding(rid) == [fleet.hub_a]


# --------------------------------------------------------------------------- 4. reprovisioning


REPROVISION_CASES = [
    # (enrollment kind, reprovisionPolicy, substatus after the move, device moves, twin data kept)
    ("group", {"updateHubAssignment": True, "migrateDeviceData": True}, "deviceDataMigrated", True, True),
    ("group", {"updateHubAssignment": True, "migrateDeviceData": False}, "deviceDataReset", True, False),
    ("group", {"updateHubAssignment": False, "migrateDeviceData": False}, "initialAssignment", False, True),
    ("group", {"updateHubAssignment": False, "migrateDeviceData": True}, "initialAssignment", False, True),
    ("individual", {"updateHubAssignment": True, "migrateDeviceData": True}, "deviceDataMigrated", True, True),
    ("individual", {"updateHubAssignment": True, "migrateDeviceData": False}, "deviceDataReset", True, False),
]


@pytest.mark.parametrize("kind,policy,substatus,moves,keeps", REPROVISION_CASES,
                         ids=["group-migrate", "group-reset", "group-never", "group-never-migrate",
                              "individual-migrate", "individual-reset"])
def test_reprovision_policy_after_moving_the_enrollment(fleet, hub_devices, kind, policy, substatus, moves, keeps):
    a, b = fleet.hub_a, HUB_B
    initial_twin = {"tags": {"origin": "enrollment"}, "properties": {"desired": {"v": 1}}}
    settings = {"iotHubHostName": a, "allocationPolicy": "static", "reprovisionPolicy": policy,
                "initialTwin": initial_twin}
    rid = unique(f"reprov-{kind[:3]}")
    if kind == "group":
        ident, group = put_group(fleet, **settings)
        key = derive_device_key(group["attestation"]["symmetricKey"]["primaryKey"], rid)
    else:
        ident = rid
        key = put_enrollment(fleet, rid, **settings)["attestation"]["symmetricKey"]["primaryKey"]

    st = assert_assigned(fleet.register(rid, key), rid, hub=a)
    created = st.created_date_time

    # device data on hub A: a reported property from the device, a desired one from the service
    dev = hub_devices(fleet.server, rid, key, hub_hostname=a)
    dev.connect()
    dev.call("patch_twin_reported_properties", {"fw": "1.2", "temp": 21})
    dev.shutdown()
    r = fleet.hub(a).patch_twin(rid, {"properties": {"desired": {"extra": 7}}})
    assert r.status_code == 200, r.text
    twin_a = fleet.twin(a, rid)
    assert twin_a["properties"]["reported"].get("fw") == "1.2", twin_a
    assert twin_a["properties"]["desired"].get("extra") == 7, twin_a

    # the operator moves the enrollment to hub B; the device registers again
    update_via_get(fleet, kind, ident, iotHubHostName=b)
    out = fleet.register(rid, key)
    want_hub = b if moves else a
    st = assert_assigned(out, rid, hub=want_hub, sub_status=substatus)
    assert st.created_date_time == created
    rec = record(fleet, rid)
    assert (rec["assignedHub"], rec["substatus"], rec["status"]) == (want_hub, substatus, "assigned"), rec

    # exactly one hub holds the identity, and it is the assigned one
    assert fleet.hubs_holding(rid) == [want_hub]
    twin = fleet.twin(want_hub, rid)
    reported, desired = twin["properties"]["reported"], twin["properties"]["desired"]
    assert desired.get("v") == 1, twin
    assert twin.get("tags") == {"origin": "enrollment"}, twin
    if keeps:
        assert reported.get("fw") == "1.2" and reported.get("temp") == 21, twin
        assert desired.get("extra") == 7, twin
    else:
        assert "fw" not in reported and "temp" not in reported, f"twin not reset: {twin}"
        assert "extra" not in desired, f"twin not reset: {twin}"

    # the device works on its (new) hub with the same key and sees the same twin
    dev = hub_devices(fleet.server, rid, key, hub_hostname=want_hub)
    dev.connect()
    seen = dev.call("get_twin")
    assert ("fw" in seen.get("reported", {})) == keeps, seen
    dev.shutdown()

    if moves:
        # back to hub A: a move like any other, the data migrated back or reset again (Azure keeps
        # `reprovisionedToInitialAssignment` for an identity DPS did not know about)
        dev = hub_devices(fleet.server, rid, key, hub_hostname=b)
        dev.connect()
        dev.call("patch_twin_reported_properties", {"onB": True})
        dev.shutdown()
        update_via_get(fleet, kind, ident, iotHubHostName=a)
        assert_assigned(fleet.register(rid, key), rid, hub=a, sub_status=substatus)
        assert fleet.hubs_holding(rid) == [a]
        reported = fleet.twin(a, rid)["properties"]["reported"]
        assert (reported.get("fw"), reported.get("onB")) == (("1.2", True) if keeps else (None, None)), reported


@pytest.mark.parametrize("migrate,substatus,keeps", [(False, "deviceDataReset", False), (True, "initialAssignment", True)],
                         ids=["reset", "migrate"])
def test_reregistering_on_the_same_hub_follows_migrate_device_data(fleet, hub_devices, migrate, substatus, keeps):
    # Azure: "Re-provision and reset to initial config ... is often used for a factory reset
    # without changing IoT hubs"
    a = fleet.hub_a
    settings = {"iotHubHostName": a, "allocationPolicy": "static",
                "reprovisionPolicy": {"updateHubAssignment": True, "migrateDeviceData": migrate},
                "initialTwin": {"tags": {"origin": "enrollment"}, "properties": {"desired": {"v": 1}}}}
    rid = unique("same-hub")
    _, group = put_group(fleet, **settings)
    key = derive_device_key(group["attestation"]["symmetricKey"]["primaryKey"], rid)
    assert_assigned(fleet.register(rid, key), rid, hub=a)
    dev = hub_devices(fleet.server, rid, key, hub_hostname=a)
    dev.connect()
    dev.call("patch_twin_reported_properties", {"fw": "1.2"})
    dev.shutdown()
    assert fleet.hub(a).patch_twin(rid, {"properties": {"desired": {"extra": 7}}}).status_code == 200

    assert_assigned(fleet.register(rid, key), rid, hub=a, sub_status=substatus)
    assert record(fleet, rid)["substatus"] == substatus
    twin = fleet.twin(a, rid)
    reported, desired = twin["properties"]["reported"], twin["properties"]["desired"]
    assert (reported.get("fw"), desired.get("extra")) == (("1.2", 7) if keeps else (None, None)), twin
    assert desired.get("v") == 1 and twin.get("tags") == {"origin": "enrollment"}, twin


# --------------------------------------------------------------------------- 5. enable / disable / delete


def test_disabled_individual_enrollment_refuses_its_device(fleet):
    # a group that would accept the id, to show the (disabled) individual enrollment still wins
    _, group = put_group(fleet, iotHubHostName=fleet.hub_a)
    rid = unique("dis-ind")
    e = put_enrollment(fleet, rid, iotHubHostName=HUB_C)
    key = e["attestation"]["symmetricKey"]["primaryKey"]
    assert_assigned(fleet.register(rid, key), rid, hub=HUB_C)

    r = fleet.svc.get_enrollment(rid)
    body = r.json()
    body.pop("registrationState", None)
    body["provisioningStatus"] = "disabled"
    r = fleet.svc.put_enrollment(body, etag=r.json()["etag"])
    assert r.status_code == 200, r.text
    assert r.json()["provisioningStatus"] == "disabled"

    msg = sdk_failure(fleet.register(rid, key))
    # DPS answers status "disabled", which the SDK does not know
    assert "invalid registration status disabled" in msg, msg
    assert sdk_failure(fleet.register(rid, derive_device_key(group["attestation"]["symmetricKey"]["primaryKey"],
                                                             rid))) == \
        "register request returned a service error status code 401"
    # the record says so (as Azure's), and still names the hub the identity stays on
    rec = record(fleet, rid)
    assert (rec["status"], rec["assignedHub"]) == ("disabled", HUB_C), rec

    update_via_get(fleet, "individual", rid, provisioningStatus="enabled")
    assert_assigned(fleet.register(rid, key), rid, hub=HUB_C, sub_status=None)


def test_deleting_the_registration_record_lets_the_device_register_afresh(fleet):
    _, group = put_group(fleet, iotHubHostName=HUB_B)
    rid = unique("fresh")
    key = derive_device_key(group["attestation"]["symmetricKey"]["primaryKey"], rid)
    st1 = assert_assigned(fleet.register(rid, key), rid, hub=HUB_B)
    rec1 = record(fleet, rid)
    assert rec1["createdDateTimeUtc"] == st1.created_date_time

    time.sleep(0.2)
    r = fleet.svc.delete_registration(rid)
    assert r.status_code == 204, r.text
    record_absent(fleet, rid)
    assert fleet.svc.delete_registration(rid).status_code == 404

    st2 = assert_assigned(fleet.register(rid, key), rid, hub=HUB_B, sub_status="initialAssignment")
    assert parse_utc(st2.created_date_time) > parse_utc(st1.created_date_time), (st1.created_date_time,
                                                                                 st2.created_date_time)
    rec2 = record(fleet, rid)
    assert rec2["createdDateTimeUtc"] == st2.created_date_time, rec2
    assert fleet.hubs_holding(rid) == [HUB_B]


def test_deleting_a_group_leaves_its_registration_records(fleet):
    gid, group = put_group(fleet, iotHubHostName=HUB_C)
    primary = group["attestation"]["symmetricKey"]["primaryKey"]
    rids = [unique("orphan") for _ in range(2)]
    for rid in rids:
        assert_assigned(fleet.register(rid, derive_device_key(primary, rid)), rid, hub=HUB_C)
    before = {rid: record(fleet, rid) for rid in rids}

    out = run_cli(fleet.server, "enrollment-group", "delete", "--group-id", gid)
    assert "2 registration record(s)" in out.stderr, out.stderr  # the CLI warns about the orphans
    assert fleet.svc.get_group(gid).status_code == 404

    for rid in rids:
        rec = record(fleet, rid)
        assert rec == before[rid], (before[rid], rec)
        assert rec["status"] == "assigned" and rec["assignedHub"] == HUB_C, rec
        assert fleet.hubs_holding(rid) == [HUB_C]
    # with its group gone the device is refused, and its record still stays
    assert sdk_failure(fleet.register(rids[0], derive_device_key(primary, rids[0]))) == \
        "register request returned a service error status code 401"
    assert record(fleet, rids[0]) == before[rids[0]]
