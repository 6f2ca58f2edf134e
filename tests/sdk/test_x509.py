"""X.509 attestation end to end with the unmodified Python SDK (azure-iot-device 2.14.0).

Certificates come from `fleetgate cert` (the expired one from openssl, which can back-date);
enrollments are made with the `fleetgate` CLI (`--certificate-path`). Devices use
`ProvisioningDeviceClient.create_from_x509_certificate` and
`IoTHubDeviceClient.create_from_x509_certificate`: no password, the certificate chain in the TLS
handshake.

Success: a device signed by an intermediate of an enrollment group's root CA, and a device of an
individual enrollment (self-signed, pinned by thumbprint), each provisions, connects to its hub
with the same certificate and sends telemetry. Refusals (each fast, 401 at DPS, nothing stored;
"not authorized" at the hub): unknown CA, expired certificate, common name not the registration
id, a disabled individual enrollment under a group, a certificate from another group's CA.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from azure.iot.device import X509
from azure.iot.device.exceptions import ClientError, CredentialError, ServiceError

import conftest
from conftest import (
    FLEETGATE_BIN,
    _can_bind,
    free_port,
    HUB_OP_TIMEOUT_S,
    REGISTER_TIMEOUT_S,
    call_with_timeout,
    run_cli,
    unique,
)

REFUSED_FAST_S = 10.0


# --------------------------------------------------------------------------- certificates


def cert_cli(*args: str) -> None:
    proc = subprocess.run([FLEETGATE_BIN, "cert", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"fleetgate cert {' '.join(args)}: {proc.stderr}"


class Pki:
    """A throw-away PKI: CA directories and device directories (cert.pem + key.pem each)."""

    def __init__(self, base: Path):
        self.base = base
        self.root = base / "root"
        self.intermediate = base / "intermediate"
        self.other_root = base / "other-root"  # another group's CA
        self.stranger = base / "stranger"  # a CA nobody enrolled
        cert_cli("create-ca", "--out", str(self.root), "--cn", "Fleetgate SDK Test Root")
        cert_cli("create-intermediate", "--ca", str(self.root), "--out", str(self.intermediate))
        cert_cli("create-ca", "--out", str(self.other_root), "--cn", "Other Group Root")
        cert_cli("create-ca", "--out", str(self.stranger), "--cn", "Fleetgate SDK Test Root")

    def device(self, ca: Path, common_name: str) -> Path:
        out = self.base / unique("dev")
        cert_cli("create-device", "--ca", str(ca), "--registration-id", common_name, "--out", str(out))
        return out

    def self_signed(self, common_name: str) -> Path:
        out = self.base / unique("solo")
        cert_cli("create-self-signed", "--registration-id", common_name, "--out", str(out))
        return out

    def expired_device(self, ca: Path, common_name: str) -> Path:
        """A device certificate whose validity ended yesterday (openssl back-dates it)."""
        out = self.base / unique("expired")
        out.mkdir()
        key, csr, cert, ext = out / "key.pem", out / "req.csr", out / "leaf.pem", out / "ext.cnf"
        ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                       "extendedKeyUsage=clientAuth\n")
        for cmd in (
            ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)],
            ["openssl", "req", "-new", "-key", str(key), "-subj", f"/CN={common_name}", "-out", str(csr)],
            ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca / "cert.pem"), "-CAkey", str(ca / "key.pem"),
             "-days", "-1", "-extfile", str(ext), "-out", str(cert)],
        ):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"
        chain = (ca / "chain.pem").read_text() if (ca / "chain.pem").exists() else ""
        (out / "cert.pem").write_text(cert.read_text() + chain)
        return out


def x509_of(device_dir: Path) -> X509:
    return X509(cert_file=str(device_dir / "cert.pem"), key_file=str(device_dir / "key.pem"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def groups(server, pki) -> dict[str, str]:
    """Two X.509 enrollment groups, made with the CLI: one per root CA."""
    ids = {"root": unique("x509-grp"), "other": unique("x509-other")}
    run_cli(server, "enrollment-group", "create", "--group-id", ids["root"],
            "--certificate-path", str(pki.root / "cert.pem"))
    run_cli(server, "enrollment-group", "create", "--group-id", ids["other"],
            "--certificate-path", str(pki.other_root / "cert.pem"))
    shown = json.loads(run_cli(server, "enrollment-group", "show", "--group-id", ids["root"]).stdout)
    info = shown["attestation"]["x509"]["signingCertificates"]["primary"]["info"]
    assert info["subjectName"] == "CN=Fleetgate SDK Test Root", info
    return ids


# --------------------------------------------------------------------------- device side


def register_x509(server, registration_id: str, device_dir: Path, **kwargs):
    from azure.iot.device import ProvisioningDeviceClient

    def run():
        client = ProvisioningDeviceClient.create_from_x509_certificate(
            provisioning_host=server.address,
            registration_id=registration_id,
            id_scope=server.id_scope,
            x509=x509_of(device_dir),
            server_verification_cert=server.ca_pem,
            **kwargs,
        )
        return client.register()

    return call_with_timeout(run, timeout=REGISTER_TIMEOUT_S, what=f"register({registration_id})")


def hub_client(server, device_id: str, device_dir: Path, hub_hostname: str | None = None, **kwargs):
    from azure.iot.device import IoTHubDeviceClient

    return IoTHubDeviceClient.create_from_x509_certificate(
        x509=x509_of(device_dir),
        hostname=hub_hostname or server.hub_hostname,
        device_id=device_id,
        server_verification_cert=server.ca_pem,
        gateway_hostname=server.address,
        connection_retry_interval=1,
        **kwargs,
    )


def shutdown(client) -> None:
    call_with_timeout(client.shutdown, timeout=HUB_OP_TIMEOUT_S, what="shutdown()")


def assert_assigned(outcome, server, registration_id: str):
    assert outcome.error is None, f"register({registration_id!r}) raised {outcome.error!r} " \
                                  f"(cause: {outcome.error.__cause__!r})"
    res = outcome.result
    assert res.status == "assigned", res
    assert res.registration_state.assigned_hub == server.hub_hostname
    assert res.registration_state.device_id == registration_id
    return res


def assert_refused(server, outcome, registration_id: str, reason: str):
    """register() fails fast with the SDK's ServiceError for status 401, nothing is stored, and the
    server logged the precise reason."""
    assert outcome.result is None, f"expected a refusal, got {outcome.result}"
    assert outcome.elapsed < REFUSED_FAST_S, f"refusal took {outcome.elapsed:.1f}s"
    err = outcome.error
    assert type(err) is ClientError, f"{type(err).__name__}: {err!r}"
    assert isinstance(err.__cause__, ServiceError), f"cause is {err.__cause__!r}"
    assert str(err.__cause__) == "register request returned a service error status code 401", str(err.__cause__)
    r = server.service.get_registration(registration_id)
    assert r.status_code == 404, f"a record was stored for {registration_id}: {r.status_code} {r.text}"
    assert server.hub_service.get_device(registration_id).status_code == 404
    # One line per refusal: the audit trail's mirror of the refused attestation.
    logged = [line for line in server.log_tail(2000).splitlines()
              if "operation=attest" in line and registration_id in line]
    assert len(logged) == 1, f"one line per refusal: {logged}"
    assert logged and reason in logged[-1], f"expected {reason!r} in the log: {logged}"


def connect_and_send(server, client, device_id: str, text: str) -> None:
    from azure.iot.device import Message

    out = call_with_timeout(client.connect, what=f"{device_id}.connect()")
    assert out.error is None, f"connect: {out.error!r} (cause {out.error.__cause__!r})"
    out = call_with_timeout(client.send_message, Message(text), what=f"{device_id}.send_message()")
    assert out.error is None, f"send_message: {out.error!r}"
    events = server.hub_service.wait_for_events(device_id, 1)
    assert any(e["event"]["payload"] == text for e in events), events


# --------------------------------------------------------------------------- success paths


def test_group_ca_device_with_an_intermediate_provisions_and_sends_telemetry(server, pki, groups):
    rid = unique("x509-dev")
    device = pki.device(pki.intermediate, rid)
    assert (device / "cert.pem").read_text().count("BEGIN CERTIFICATE") == 2  # leaf + intermediate
    assert_assigned(register_x509(server, rid, device), server, rid)

    record = server.service.get_registration(rid)
    assert record.status_code == 200, record.text
    identity = server.hub_service.get_device(rid).json()
    assert identity["authentication"]["type"] == "certificateAuthority", identity

    client = hub_client(server, rid, device)
    try:
        connect_and_send(server, client, rid, f"hello from {rid}")
    finally:
        shutdown(client)


def test_individual_enrollment_device_provisions_and_sends_telemetry(server, pki):
    rid = unique("x509-solo")
    device = pki.self_signed(rid)
    created = json.loads(run_cli(server, "enrollment", "create", "--registration-id", rid,
                                 "--certificate-path", str(device / "cert.pem")).stdout)
    thumbprint = created["attestation"]["x509"]["clientCertificates"]["primary"]["info"]["sha256Thumbprint"]
    assert_assigned(register_x509(server, rid, device), server, rid)

    identity = server.hub_service.get_device(rid).json()
    assert identity["authentication"]["type"] == "selfSigned", identity
    assert identity["authentication"]["x509Thumbprint"]["primaryThumbprint"] == thumbprint

    client = hub_client(server, rid, device)
    try:
        connect_and_send(server, client, rid, f"hello from {rid}")
    finally:
        shutdown(client)


# --------------------------------------------------------------------------- refusals


def test_unknown_ca_is_refused(server, pki, groups):
    rid = unique("x509-unknown-ca")
    assert_refused(server, register_x509(server, rid, pki.device(pki.stranger, rid)), rid,
                   "does not lead to a trusted CA")


def test_expired_certificate_is_refused(server, pki, groups):
    rid = unique("x509-expired")
    assert_refused(server, register_x509(server, rid, pki.expired_device(pki.intermediate, rid)), rid,
                   "has expired")


def test_common_name_not_matching_the_registration_id_is_refused(server, pki, groups):
    rid = unique("x509-cn")
    assert_refused(server, register_x509(server, rid, pki.device(pki.intermediate, unique("someone-else"))), rid,
                   "common name")


def test_disabled_individual_enrollment_under_a_group_is_refused(server, pki, groups):
    rid = unique("x509-revoked")
    device = pki.device(pki.intermediate, rid)
    run_cli(server, "enrollment", "create", "--registration-id", rid, "--certificate-path", str(device / "cert.pem"),
            "--provisioning-status", "disabled")
    assert_refused(server, register_x509(server, rid, device), rid, "disabled (revoked)")
    # Its group still provisions the others.
    other = unique("x509-neighbour")
    assert_assigned(register_x509(server, other, pki.device(pki.intermediate, other)), server, other)


def test_certificate_from_another_groups_ca_is_refused(server, pki, groups):
    # Enrolled individually with its own certificate: another group's CA does not get it in.
    rid = unique("x509-pinned")
    own = pki.device(pki.root, rid)
    run_cli(server, "enrollment", "create", "--registration-id", rid, "--certificate-path", str(own / "cert.pem"))
    assert_refused(server, register_x509(server, rid, pki.device(pki.other_root, rid)), rid,
                   "not one of the individual enrollment's")


def test_hub_refuses_a_certificate_from_another_groups_ca(server, pki, groups):
    rid = unique("x509-hub")
    device = pki.device(pki.intermediate, rid)
    assert_assigned(register_x509(server, rid, device), server, rid)
    impostor = hub_client(server, rid, pki.device(pki.other_root, rid))
    try:
        out = call_with_timeout(impostor.connect, what="impostor.connect()")
        assert isinstance(out.error, CredentialError), f"{out.error!r}"
        assert out.elapsed < REFUSED_FAST_S, f"refusal took {out.elapsed:.1f}s"
    finally:
        shutdown(impostor)
    # The device itself still connects.
    client = hub_client(server, rid, device)
    try:
        connect_and_send(server, client, rid, "still me")
    finally:
        shutdown(client)


# --------------------------------------------------------------------------- MQTT over WebSockets


@pytest.fixture(scope="module")
def ws_x509_server(server_factory):
    """A server whose HTTPS port is 443 (the SDK's websocket port) and whose MQTT port is not 8883:
    whatever works here went over the WebSocket, authenticated by the HTTPS connection's certificate."""
    srv = server_factory("x509-websockets")
    if not _can_bind(srv.address, 443):
        pytest.fail(f"port 443 is not bindable on {srv.address} (the SDK's websocket port)", pytrace=False)
    srv.https_port = 443
    saved = conftest.MQTT_PORT
    conftest.MQTT_PORT = free_port(srv.address)
    try:
        srv.start()
    finally:
        conftest.MQTT_PORT = saved
    return srv


def test_group_ca_device_provisions_and_sends_telemetry_over_websockets(ws_x509_server, pki):
    srv = ws_x509_server
    group = unique("x509-ws")
    run_cli(srv, "enrollment-group", "create", "--group-id", group, "--certificate-path", str(pki.root / "cert.pem"))
    rid = unique("x509-ws-dev")
    device = pki.device(pki.intermediate, rid)
    assert_assigned(register_x509(srv, rid, device, websockets=True), srv, rid)
    client = hub_client(srv, rid, device, websockets=True)
    try:
        connect_and_send(srv, client, rid, f"over websockets from {rid}")
    finally:
        shutdown(client)
    # Refusals look the same over WebSockets.
    stranger = unique("x509-ws-stranger")
    assert_refused(srv, register_x509(srv, stranger, pki.device(pki.stranger, stranger), websockets=True), stranger,
                   "does not lead to a trusted CA")
