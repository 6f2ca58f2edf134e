"""End-to-end compatibility tests: Fleetgate vs. the Azure IoT Python device SDK (2.14.0).

Device side: azure.iot.device.ProvisioningDeviceClient over MQTT/TLS (port 8883).
Service side: the DPS data-plane REST API (api-version 2021-10-01) with SAS auth.
"""

from __future__ import annotations

import base64
import concurrent.futures
import logging
import math
import time

import pytest
from azure.iot.device.exceptions import ClientError, ServiceError

from conftest import (
    REGISTER_TIMEOUT_S,
    derive_device_key,
    parse_utc,
    random_key,
    unique,
)

VALID_SUBSTATUS = {"initialAssignment", "deviceDataMigrated", "deviceDataReset", "reprovisionedToInitialAssignment"}


# --------------------------------------------------------------------------- helpers


def assert_assigned(outcome, server, registration_id):
    assert outcome.error is None, f"register({registration_id!r}) raised {outcome.error!r} " \
                                  f"(cause: {outcome.error.__cause__!r})"
    res = outcome.result
    assert res.status == "assigned", res
    state = res.registration_state
    assert state is not None
    assert state.assigned_hub == server.hub_hostname
    assert state.device_id == registration_id
    assert state.sub_status == "initialAssignment"
    return res


def assert_service_error(outcome, status_code: int | None = None, contains: str | None = None):
    """register() must fail fast with ClientError('Unexpected failure') caused by a ServiceError."""
    assert outcome.result is None, f"expected failure, got result {outcome.result}"
    err = outcome.error
    assert err is not None
    assert outcome.elapsed < REGISTER_TIMEOUT_S
    assert type(err) is ClientError, f"{type(err).__name__}: {err!r}"
    cause = err.__cause__
    assert isinstance(cause, ServiceError), f"cause is {cause!r}"
    msg = str(cause)
    # the SDK's own 30 s "Operation timed out" would also be a ServiceError; rule it out
    assert "timed out" not in msg, msg
    if status_code is not None:
        assert msg == f"register request returned a service error status code {status_code}", msg
    if contains is not None:
        assert contains in msg, msg
    return cause


def assert_error_body(resp, status: int, error_code: int):
    assert resp.status_code == status, f"{resp.request.method} {resp.url}: {resp.status_code} {resp.text}"
    body = resp.json()
    assert body["errorCode"] == error_code, body
    assert body["trackingId"], body
    assert body["message"], body
    parse_utc(body["timestampUtc"])
    return body


def device_row(server, device_id: str):
    return server.device_rows().get((server.hub_hostname.lower(), device_id.lower()))


# --------------------------------------------------------------------------- service API sanity


def test_enrollment_group_rest_roundtrip(service):
    gid = unique("grp-rest")
    k1, k2 = random_key(), random_key()
    created = service.create_group(gid, primary_key=k1, secondary_key=k2)
    assert created["attestation"] == {"type": "symmetricKey", "symmetricKey": {"primaryKey": k1, "secondaryKey": k2}}
    assert created["provisioningStatus"] == "enabled"
    etag = created["etag"]
    assert etag

    # GET hides the keys, attestationmechanism reveals them
    r = service.get_group(gid)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["enrollmentGroupId"] == gid
    assert got["etag"] == etag
    assert "primaryKey" not in got["attestation"].get("symmetricKey", {})
    assert "secondaryKey" not in got["attestation"].get("symmetricKey", {})
    r = service.get_attestation(gid)
    assert r.status_code == 200, r.text
    assert r.json() == {"type": "symmetricKey", "symmetricKey": {"primaryKey": k1, "secondaryKey": k2}}

    # optimistic concurrency: matching etag updates, stale etag -> 412
    r = service.put_group(gid, primary_key=k1, secondary_key=k2, status="disabled", etag=etag)
    assert r.status_code == 200, r.text
    new_etag = r.json()["etag"]
    assert new_etag != etag
    assert r.json()["provisioningStatus"] == "disabled"
    r = service.put_group(gid, primary_key=k1, secondary_key=k2, status="enabled", etag=etag)
    assert_error_body(r, 412, 412002)
    assert service.get_group(gid).json()["provisioningStatus"] == "disabled"

    # generated keys when omitted
    gid2 = unique("grp-rest-gen")
    gen = service.create_group(gid2)["attestation"]["symmetricKey"]
    assert gen["primaryKey"] != gen["secondaryKey"]
    assert len(base64.b64decode(gen["primaryKey"])) >= 32

    # delete
    assert service.delete_group(gid).status_code == 204
    assert service.delete_group(gid2).status_code == 204
    assert service.get_group(gid).status_code == 404

    # a bad SAS signature is rejected with 401 + errorCode 401002
    bad = service.sas_token(key=random_key())
    assert_error_body(service.request("GET", f"/enrollmentGroups/{gid2}", token=bad), 401, 401002)


# --------------------------------------------------------------------------- 1. bulk provisioning


def test_parallel_provisioning_primary_and_secondary_keys(server, service):
    gid = unique("grp-bulk")
    created = service.create_group(gid)  # keys generated by the server
    att = service.get_attestation(gid)
    assert att.status_code == 200, att.text
    keys = att.json()["symmetricKey"]
    assert keys == created["attestation"]["symmetricKey"]
    primary, secondary = keys["primaryKey"], keys["secondaryKey"]

    suffix = gid.rsplit("-", 1)[1]
    rids = [f"bulk-{i:02d}-{suffix}" for i in range(50)]
    device_keys = {rid: derive_device_key(primary if i % 2 == 0 else secondary, rid) for i, rid in enumerate(rids)}

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        futures = {rid: pool.submit(server.register, rid, device_keys[rid]) for rid in rids}
        outcomes = {rid: f.result() for rid, f in futures.items()}
    elapsed = time.monotonic() - t0
    print(f"provisioned {len(rids)} devices in {elapsed:.2f}s")

    for rid in rids:
        assert_assigned(outcomes[rid], server, rid)

    # registration records, paged 7 at a time
    records, pages = service.query_registrations(gid, page_size=7)
    assert len(pages) >= math.ceil(50 / 7), pages
    assert all(n <= 7 for n, _ in pages), pages
    assert all(c for _, c in pages[:-1]) and pages[-1][1] is None, pages
    ids = [r["registrationId"] for r in records]
    assert len(ids) == len(set(ids)), "duplicate records across pages"
    assert set(ids) == set(rids)
    for rec in records:
        assert rec["status"] == "assigned", rec
        assert rec["substatus"] == "initialAssignment", rec
        assert rec["assignedHub"] == server.hub_hostname, rec
        assert rec["deviceId"] == rec["registrationId"], rec
        assert rec["etag"], rec
        assert parse_utc(rec["createdDateTimeUtc"]) <= parse_utc(rec["lastUpdatedDateTimeUtc"])

    # device identities created in the hub, keyed from the group's primary/secondary keys
    rows = server.device_rows()
    hub_key = server.hub_hostname.lower()
    for rid in rids:
        row = rows.get((hub_key, rid.lower()))
        assert row is not None, f"no device identity for {rid}"
        assert row["deviceId"] == rid
        assert row["hub"] == server.hub_hostname
        assert row["primaryKey"] == derive_device_key(primary, rid), rid
        assert row["secondaryKey"] == derive_device_key(secondary, rid), rid
        assert row["status"] == "enabled", row


# --------------------------------------------------------------------------- 2. re-registration


def test_reregistration_returns_same_assignment(server, service):
    gid = unique("grp-rereg")
    primary = service.create_group(gid)["attestation"]["symmetricKey"]["primaryKey"]
    rid = unique("rereg-dev")
    key = derive_device_key(primary, rid)

    first = assert_assigned(server.register(rid, key), server, rid)
    r1 = service.get_registration(rid)
    assert r1.status_code == 200, r1.text
    rec1 = r1.json()
    assert rec1["registrationId"] == rid
    assert rec1["createdDateTimeUtc"] == first.registration_state.created_date_time

    time.sleep(0.3)
    out2 = server.register(rid, key)
    assert out2.error is None, repr(out2.error)
    second = out2.result
    assert second.status == "assigned"
    assert second.registration_state.assigned_hub == first.registration_state.assigned_hub
    assert second.registration_state.device_id == first.registration_state.device_id
    assert second.registration_state.sub_status in VALID_SUBSTATUS
    assert second.registration_state.created_date_time == first.registration_state.created_date_time

    r2 = service.get_registration(rid)
    assert r2.status_code == 200, r2.text
    rec2 = r2.json()
    assert rec2["assignedHub"] == rec1["assignedHub"]
    assert rec2["deviceId"] == rec1["deviceId"]
    assert rec2["createdDateTimeUtc"] == rec1["createdDateTimeUtc"]
    assert parse_utc(rec2["lastUpdatedDateTimeUtc"]) > parse_utc(rec1["lastUpdatedDateTimeUtc"])

    # still exactly one record for the device in its group
    records, _ = service.query_registrations(gid)
    assert [r["registrationId"] for r in records] == [rid]


# --------------------------------------------------------------------------- 3. case-insensitive ids


def test_registration_id_is_case_insensitive(server, service):
    gid = unique("grp-case")
    primary = service.create_group(gid)["attestation"]["symmetricKey"]["primaryKey"]
    rid = "Case-Dev-1"
    out = server.register(rid, derive_device_key(primary, rid))
    assert out.error is None, f"{out.error!r} cause {out.error.__cause__!r}"
    assert out.result.status == "assigned"
    assert out.result.registration_state.device_id.lower() == rid.lower()

    for lookup in ("case-dev-1", "CASE-DEV-1", rid):
        r = service.get_registration(lookup)
        assert r.status_code == 200, f"GET /registrations/{lookup}: {r.status_code} {r.text}"
        rec = r.json()
        assert rec["registrationId"].lower() == "case-dev-1"
        assert rec["status"] == "assigned"
        assert rec["assignedHub"] == server.hub_hostname


# --------------------------------------------------------------------------- 4. negative cases


@pytest.fixture(scope="module")
def neg_group(service):
    gid = unique("grp-neg")
    keys = service.create_group(gid)["attestation"]["symmetricKey"]
    return gid, keys["primaryKey"]


def test_wrong_random_key_is_unauthorized(server, service, neg_group):
    rid = unique("neg-randkey")
    out = server.register(rid, random_key())
    assert_service_error(out, status_code=401)
    assert_error_body(service.get_registration(rid), 404, 404201)
    assert device_row(server, rid) is None


def test_key_derived_for_other_registration_id_is_unauthorized(server, service, neg_group):
    _, primary = neg_group
    rid, other = unique("neg-victim"), unique("neg-other")
    out = server.register(rid, derive_device_key(primary, other))
    assert_service_error(out, status_code=401)
    assert_error_body(service.get_registration(rid), 404, 404201)
    assert_error_body(service.get_registration(other), 404, 404201)
    assert device_row(server, rid) is None


def test_disabled_group_is_refused(server, service):
    gid = unique("grp-disabled")
    primary = service.create_group(gid, status="disabled")["attestation"]["symmetricKey"]["primaryKey"]
    rid = unique("neg-disabled")
    out = server.register(rid, derive_device_key(primary, rid))
    # DPS answers 200 {"status": "disabled"}; the SDK treats the unknown status as a ServiceError
    assert_service_error(out, contains="invalid registration status disabled")
    r = service.get_registration(rid)
    if r.status_code == 200:
        assert r.json()["status"] != "assigned", r.json()
    else:
        assert_error_body(r, 404, 404201)
    assert device_row(server, rid) is None


@pytest.mark.parametrize("rid", ["bad id!", "ends-with.", "a" * 129], ids=["space-bang", "trailing-dot", "129-chars"])
def test_invalid_registration_id_is_bad_request(server, service, neg_group, rid):
    _, primary = neg_group
    out = server.register(rid, derive_device_key(primary, rid))
    assert_service_error(out, status_code=400)
    r = service.get_registration(rid)
    assert r.status_code in (400, 404), f"GET /registrations/{rid!r}: {r.status_code} {r.text}"
    assert device_row(server, rid) is None


# --------------------------------------------------------------------------- 5. 202 + polling


@pytest.fixture(scope="module")
def polling_server(server, server_factory):
    # `server` first so the main server keeps 127.0.0.1 and this one gets the next address
    return server_factory("polling", registration_response="polling").start()


def _polling_log_count(records) -> int:
    return sum(1 for r in records if r.getMessage().endswith(": polling"))


def test_polling_registration_flow(server, polling_server, caplog):
    caplog.set_level(logging.INFO, logger="azure.iot.device.provisioning")
    srv = polling_server
    assert srv.address != server.address
    svc = srv.service
    gid = unique("grp-poll")
    primary = svc.create_group(gid)["attestation"]["symmetricKey"]["primaryKey"]
    rids = [unique(f"poll-{i}") for i in range(3)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = dict(zip(rids, pool.map(lambda rid: srv.register(rid, derive_device_key(primary, rid)), rids)))
    for rid in rids:
        assert_assigned(outcomes[rid], srv, rid)
        r = svc.get_registration(rid)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "assigned"
    records, _ = svc.query_registrations(gid)
    assert sorted(r["registrationId"] for r in records) == sorted(rids)
    # the SDK really went through "assigning" -> operation status polling
    assert _polling_log_count(caplog.records) >= 3, [r.getMessage() for r in caplog.records][-30:]

    # control: the immediate-mode server never makes the SDK poll
    caplog.clear()
    gid2 = unique("grp-poll-ctl")
    p2 = server.service.create_group(gid2)["attestation"]["symmetricKey"]["primaryKey"]
    rid2 = unique("poll-ctl")
    assert_assigned(server.register(rid2, derive_device_key(p2, rid2)), server, rid2)
    assert _polling_log_count(caplog.records) == 0


# --------------------------------------------------------------------------- 6. restart


def test_restart_keeps_instance_and_assignments(server, server_factory):
    srv = server_factory("restart").start()
    before = dict(srv.instance)
    svc = srv.service
    gid = unique("grp-restart")
    primary = svc.create_group(gid)["attestation"]["symmetricKey"]["primaryKey"]
    rid = unique("restart-dev")
    key = derive_device_key(primary, rid)
    first = assert_assigned(srv.register(rid, key), srv, rid)
    rec1 = svc.get_registration(rid).json()

    assert srv.stop() == 0, f"unclean shutdown\n{srv.log_tail()}"
    assert not srv.running
    srv.start()

    after = srv.instance
    assert after["idScope"] == before["idScope"]
    assert after["caCertificate"] == before["caCertificate"]
    assert after["serviceConnectionString"] == before["serviceConnectionString"]
    assert [h["hostName"] for h in after["hubs"]] == [h["hostName"] for h in before["hubs"]]

    svc = srv.service  # fresh client against the restarted server
    assert svc.get_group(gid).status_code == 200
    r = svc.get_registration(rid)
    assert r.status_code == 200, r.text
    assert r.json()["createdDateTimeUtc"] == rec1["createdDateTimeUtc"]

    out = srv.register(rid, key)
    assert out.error is None, f"{out.error!r} cause {out.error.__cause__!r}"
    again = out.result
    assert again.status == "assigned"
    assert again.registration_state.assigned_hub == first.registration_state.assigned_hub
    assert again.registration_state.device_id == first.registration_state.device_id
    assert again.registration_state.created_date_time == first.registration_state.created_date_time
    rec2 = svc.get_registration(rid).json()
    assert rec2["createdDateTimeUtc"] == rec1["createdDateTimeUtc"]
    assert parse_utc(rec2["lastUpdatedDateTimeUtc"]) > parse_utc(rec1["lastUpdatedDateTimeUtc"])
