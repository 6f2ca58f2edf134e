"""Throttling as Azure does it, seen from the unmodified Python SDK: a registration storm above
the ID scope's quota gets 429s with retry-after, the SDK backs off, and every device is assigned."""

import concurrent.futures as cf
import re
import time

import requests

from conftest import derive_device_key, register_device, unique


def metric(server, name_with_labels: str) -> float:
    # /metrics on the HTTPS port takes a DPS policy's token (the owner's here).
    text = requests.get(f"https://{server.address}:{server.https_port}/metrics", verify=server.ca_path, timeout=10,
                        headers={"Authorization": server.service.sas_token()}).text
    m = re.search(re.escape(name_with_labels) + r" (\d+(?:\.\d+)?)", text)
    return float(m.group(1)) if m else 0.0


def test_registration_storm_above_the_quota_is_throttled_then_all_assigned(server_factory):
    srv = server_factory("throttled")
    # 120 a minute = 2 a second, burst 2: a storm of 16 is well above it.
    srv.extra_args = ["--dps-registrations-per-minute", "120"]
    srv.start()
    group = unique("storm")
    keys = srv.service.create_group(group)
    primary = keys["attestation"]["symmetricKey"]["primaryKey"]
    ids = [f"{group}-{i:02d}" for i in range(16)]
    started = time.monotonic()
    with cf.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(
            lambda rid: register_device(srv.address, srv.id_scope, srv.ca_pem, rid,
                                        derive_device_key(primary, rid), timeout=60.0),
            ids))
    elapsed = time.monotonic() - started
    for rid, r in zip(ids, results):
        assert r.error is None, f"{rid}: {r.error!r}"
        assert r.result.status == "assigned", rid
    throttled = metric(srv, 'fleetgate_throttled_total{kind="registration"}')
    assert throttled >= 8, f"the storm was throttled ({throttled} refusals)"
    # 16 admissions at 2 a second take several seconds: the quota held, and nothing was lost.
    assert elapsed >= 4, elapsed
    records, _ = srv.service.query_registrations(group)
    assert sorted(r["registrationId"] for r in records) == sorted(ids)
