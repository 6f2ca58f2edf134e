"""Fixtures and helpers for the Fleetgate <-> Azure IoT Python SDK compatibility suite.

Nothing here builds the server: the binary is taken from ``FLEETGATE_BIN`` or
``<repo>/target/debug/fleetgate`` (``cargo build -p fleetgate``).

The Python SDK (azure-iot-device 2.14.0) always dials MQTT port 8883, so every
server gets its own loopback address (127.0.0.1, 127.0.0.2, ...) and a free
HTTPS port on that address.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
FLEETGATE_BIN = os.environ.get("FLEETGATE_BIN", str(REPO_ROOT / "target" / "debug" / "fleetgate"))
MQTT_PORT = 8883  # hard-coded in the Python SDK
API_VERSION = "2021-10-01"
SERVICE_KEY_NAME = "provisioningserviceowner"
REGISTER_TIMEOUT_S = 20.0  # a register() call that takes longer than this fails the test
STARTUP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 150

# Every server started in this session, so failing tests can show their logs.
_ALL_SERVERS: list["FleetgateServer"] = []
_USED_ADDRESSES: set[str] = set()


# --------------------------------------------------------------------------- helpers


def derive_device_key(group_key_b64: str, registration_id: str) -> str:
    """Group-enrollment device key: base64(HMAC-SHA256(b64decode(groupKey), registrationId))."""
    digest = hmac.new(base64.b64decode(group_key_b64), registration_id.encode("utf-8"), hashlib.sha256)
    return base64.b64encode(digest.digest()).decode("ascii")


def random_key() -> str:
    return base64.b64encode(os.urandom(64)).decode("ascii")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def parse_utc(ts: str) -> dt.datetime:
    """Parse DPS timestamps such as ``2026-11-28T13:53:12.9781929Z`` (7 fractional digits)."""
    assert ts.endswith("Z"), ts
    body = ts[:-1]
    if "." in body:
        head, frac = body.split(".", 1)
        body = f"{head}.{(frac + '000000')[:6]}"
    else:
        body = f"{body}.000000"
    return dt.datetime.strptime(body, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=dt.timezone.utc)


def _can_bind(address: str, port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def allocate_loopback() -> str:
    """Next 127.0.0.N (N from 1) not used in this session whose port 8883 is free."""
    for n in range(1, 255):
        addr = f"127.0.0.{n}"
        if addr in _USED_ADDRESSES:
            continue
        if _can_bind(addr, MQTT_PORT):
            _USED_ADDRESSES.add(addr)
            return addr
    raise RuntimeError("no loopback address with a free port 8883")


def free_port(address: str) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((address, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def _tcp_ok(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def parse_connection_string(cs: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in cs.split(";") if part)


# --------------------------------------------------------------------------- service API


class ServiceApi:
    """Minimal client for the DPS service (data-plane) REST API."""

    def __init__(self, connection_string: str, ca_path: str):
        cs = parse_connection_string(connection_string)
        self.host = cs["HostName"]  # includes ":port" when not 443
        self.key_name = cs["SharedAccessKeyName"]
        self.key = cs["SharedAccessKey"]
        self.ca_path = ca_path
        self.session = requests.Session()

    # SAS: sr is the url-encoded host; the string signed is exactly "{sr}\n{se}".
    def sas_token(self, ttl_s: int = 3600, key: str | None = None, key_name: str | None = None) -> str:
        se = int(time.time()) + ttl_s
        sr = urllib.parse.quote(self.host, safe="")
        mac = hmac.new(base64.b64decode(key or self.key), f"{sr}\n{se}".encode("utf-8"), hashlib.sha256)
        sig = base64.b64encode(mac.digest()).decode("ascii")
        return (
            f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}"
            f"&se={se}&skn={key_name or self.key_name}"
        )

    def request(self, method: str, path: str, *, json_body=None, headers=None, token: str | None = None):
        hdrs = {"Authorization": token or self.sas_token()}
        if headers:
            hdrs.update(headers)
        # verify= must be passed per request: a REQUESTS_CA_BUNDLE in the environment
        # would otherwise override Session.verify.
        return self.session.request(
            method,
            f"https://{self.host}{path}",
            params={"api-version": API_VERSION},
            headers=hdrs,
            json=json_body,
            verify=self.ca_path,
            timeout=15,
        )

    # enrollment groups
    def put_group(self, group_id: str, *, primary_key=None, secondary_key=None, status="enabled", etag=None):
        sym = {}
        if primary_key:
            sym["primaryKey"] = primary_key
        if secondary_key:
            sym["secondaryKey"] = secondary_key
        body = {
            "enrollmentGroupId": group_id,
            "attestation": {"type": "symmetricKey", "symmetricKey": sym},
            "provisioningStatus": status,
        }
        headers = {"If-Match": etag} if etag else None
        return self.request("PUT", f"/enrollmentGroups/{urllib.parse.quote(group_id, safe='')}",
                            json_body=body, headers=headers)

    def create_group(self, group_id: str, **kw) -> dict:
        r = self.put_group(group_id, **kw)
        assert r.status_code == 200, f"PUT /enrollmentGroups/{group_id}: {r.status_code} {r.text}"
        body = r.json()
        assert body["enrollmentGroupId"] == group_id
        assert body["attestation"]["symmetricKey"]["primaryKey"]
        assert body["attestation"]["symmetricKey"]["secondaryKey"]
        return body

    def get_group(self, group_id: str):
        return self.request("GET", f"/enrollmentGroups/{urllib.parse.quote(group_id, safe='')}")

    def get_attestation(self, group_id: str):
        return self.request("POST", f"/enrollmentGroups/{urllib.parse.quote(group_id, safe='')}/attestationmechanism")

    def delete_group(self, group_id: str, etag: str | None = None):
        return self.request("DELETE", f"/enrollmentGroups/{urllib.parse.quote(group_id, safe='')}",
                            headers={"If-Match": etag} if etag else None)

    # registration records
    def get_registration(self, registration_id: str):
        return self.request("GET", f"/registrations/{urllib.parse.quote(registration_id, safe='')}")

    def query_registrations(self, group_id: str, page_size: int = 100, max_pages: int = 1000):
        """All registration records of a group, following x-ms-continuation.

        Returns (records, pages) where pages is a list of (item_count, continuation_or_None).
        """
        records, pages, continuation = [], [], None
        for _ in range(max_pages):
            headers = {"x-ms-max-item-count": str(page_size)}
            if continuation:
                headers["x-ms-continuation"] = continuation
            r = self.request("POST", f"/registrations/{urllib.parse.quote(group_id, safe='')}/query",
                             json_body={"query": "SELECT * FROM registrations"}, headers=headers)
            assert r.status_code == 200, f"query page {len(pages)}: {r.status_code} {r.text}"
            page = r.json()
            assert isinstance(page, list), page
            continuation = r.headers.get("x-ms-continuation")
            pages.append((len(page), continuation))
            records.extend(page)
            if not continuation:
                return records, pages
        raise AssertionError(f"query did not finish after {max_pages} pages: {pages[-5:]}")


# --------------------------------------------------------------------------- server process


class FleetgateServer:
    def __init__(self, name: str, base_dir: Path, address: str, registration_response: str = "immediate"):
        self.name = name
        self.address = address
        self.registration_response = registration_response
        self.data_dir = base_dir / "data"
        self.stdout_path = base_dir / "stdout.log"
        self.stderr_path = base_dir / "stderr.log"
        self.https_port = free_port(address)
        self.proc: subprocess.Popen | None = None
        self.died_unexpectedly = False
        self._instance: dict | None = None
        self._service: ServiceApi | None = None
        # More `fleetgate serve` flags (e.g. quotas) for servers a test configures itself.
        self.extra_args: list[str] = []
        # The names the certificate covers (`--hostname`, in order: the first names the hub made on
        # first start); tests that dial Azure's names through a hosts override set their own.
        self.hostnames: list[str] = [address]
        _ALL_SERVERS.append(self)

    # ---- lifecycle
    def start(self) -> "FleetgateServer":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if not Path(FLEETGATE_BIN).is_file():
            pytest.fail(f"fleetgate binary not found at {FLEETGATE_BIN}; run `cargo build -p fleetgate` "
                        f"or set FLEETGATE_BIN", pytrace=False)
        cmd = [
            FLEETGATE_BIN, "serve",
            "--data-dir", str(self.data_dir),
            "--listen", self.address,
            "--mqtt-port", str(MQTT_PORT),
            "--https-port", str(self.https_port),
            *(arg for name in self.hostnames for arg in ("--hostname", name)),
            "--registration-response", self.registration_response,
            # Every client of the suite connects from this one loopback address, and tests check
            # that the log says why each refusal happened: record them all in full, as an
            # operator would for a single source under investigation (the per-source summary
            # is tested in crates/server/tests/faults.rs).
            "--auth-failures-recorded", "100000",
            # A small free-space reserve: the suite must not depend on how full the disk is.
            "--disk-reserve-bytes", "64M",
            *self.extra_args,
        ]
        env = dict(os.environ, NO_COLOR="1")
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            err.write(f"\n===== start: {' '.join(cmd)}\n".encode())
            err.flush()
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        self._instance = None
        self._service = None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fleetgate '{self.name}' exited with {self.proc.returncode} during startup\n"
                                   f"{self.log_tail()}")
            if self._read_instance() is not None and _tcp_ok(self.address, MQTT_PORT) \
                    and _tcp_ok(self.address, self.https_port):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fleetgate '{self.name}' not ready after {STARTUP_TIMEOUT_S}s\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then wait; returns the exit code (None if it was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            self.died_unexpectedly = True
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise RuntimeError(f"fleetgate '{self.name}' ignored SIGTERM for {timeout}s\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- instance data
    def _read_instance(self) -> dict | None:
        try:
            return json.loads((self.data_dir / "instance.json").read_text())
        except (OSError, ValueError):
            return None

    @property
    def instance(self) -> dict:
        if self._instance is None:
            self._instance = self._read_instance()
            assert self._instance is not None, "instance.json missing"
        return self._instance

    @property
    def id_scope(self) -> str:
        return self.instance["idScope"]

    @property
    def ca_path(self) -> str:
        return self.instance["caCertificate"]

    @property
    def ca_pem(self) -> str:
        return Path(self.ca_path).read_text()

    @property
    def hub_hostname(self) -> str:
        return self.instance["hubs"][0]["hostName"]

    @property
    def service(self) -> ServiceApi:
        if self._service is None:
            self._service = ServiceApi(self.instance["serviceConnectionString"], self.ca_path)
        return self._service

    @property
    def hub_service(self) -> "HubServiceApi":
        """A fresh client for the hub service API of the first hub (fresh: pooled connections
        do not survive a restart)."""
        hub = self.instance["hubs"][0]
        return HubServiceApi(hub["connectionString"], self.ca_path, self.address, self.https_port)

    # ---- device-side helpers
    def register(self, registration_id: str, key: str, timeout: float = REGISTER_TIMEOUT_S):
        return register_device(self.address, self.id_scope, self.ca_pem, registration_id, key, timeout)

    def device_rows(self) -> dict[tuple[str, str], dict]:
        """Device identities from the SQLite store (read-only; the hub API does not exist yet)."""
        uri = f"file:{self.data_dir / 'fleetgate.db'}?mode=ro"
        con = sqlite3.connect(uri, uri=True, timeout=10)
        try:
            rows = con.execute("SELECT hub_key, device_key, body FROM devices").fetchall()
        finally:
            con.close()
        return {(hub, dev): json.loads(body) for hub, dev, body in rows}

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class RegisterOutcome:
    """What a register() call produced: .result or .error, plus .elapsed seconds."""

    def __init__(self):
        self.result = None
        self.error: BaseException | None = None
        self.elapsed: float | None = None


def register_device(host: str, id_scope: str, ca_pem: str, registration_id: str, key: str,
                    timeout: float = REGISTER_TIMEOUT_S) -> RegisterOutcome:
    """Run ProvisioningDeviceClient.register() in a daemon thread; fail the test if it hangs."""
    from azure.iot.device import ProvisioningDeviceClient

    outcome = RegisterOutcome()

    def run():
        t0 = time.monotonic()
        try:
            client = ProvisioningDeviceClient.create_from_symmetric_key(
                provisioning_host=host,
                registration_id=registration_id,
                id_scope=id_scope,
                symmetric_key=key,
                server_verification_cert=ca_pem,
            )
            outcome.result = client.register()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            outcome.error = e
        finally:
            outcome.elapsed = time.monotonic() - t0

    t = threading.Thread(target=run, name=f"register-{registration_id}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"register({registration_id!r}) did not return within {timeout}s", pytrace=False)
    return outcome


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory):
    """Create (not start) servers on their own loopback address; all are stopped at session end."""
    created: list[FleetgateServer] = []

    def make(name: str, registration_response: str = "immediate") -> FleetgateServer:
        srv = FleetgateServer(name, tmp_path_factory.mktemp(f"fleetgate-{name}"), allocate_loopback(),
                              registration_response)
        created.append(srv)
        return srv

    yield make

    problems = []
    for srv in created:
        try:
            code = srv.stop()
        except RuntimeError as e:
            problems.append(str(e))
            continue
        if srv.died_unexpectedly:
            problems.append(f"fleetgate '{srv.name}' had exited on its own with code {code}\n{srv.log_tail()}")
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def server(server_factory) -> FleetgateServer:
    """The main server (immediate 200 responses), shared by the whole session."""
    return server_factory("main").start()


@pytest.fixture(scope="session")
def service(server) -> ServiceApi:
    return server.service


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for srv in _ALL_SERVERS:
            if srv.stderr_path.exists():
                rep.sections.append((f"fleetgate '{srv.name}' log ({srv.stderr_path})", srv.log_tail()))


# --------------------------------------------------------------------------- hub: service API and device side

HUB_API_VERSION = "2021-04-12"
HUB_OP_TIMEOUT_S = 15.0  # any single device-client call (connect, send, twin, ...) must finish within this


class HubServiceApi:
    """Minimal client for the hub service REST API (devices, twins, methods, C2D, telemetry).

    The hub's connection string names the hub (``HostName=localhost:PORT``): that name goes into
    the SAS token, while the HTTPS requests go to the server's own loopback address.
    """

    def __init__(self, connection_string: str, ca_path: str, address: str, port: int):
        cs = parse_connection_string(connection_string)
        self.host = cs["HostName"]  # the hub name (plus ":port"), signed into `sr`
        self.key_name = cs["SharedAccessKeyName"]
        self.key = cs["SharedAccessKey"]
        self.ca_path = ca_path
        self.base_url = f"https://{address}:{port}"
        self.session = requests.Session()

    def sas_token(self, ttl_s: int = 3600, key: str | None = None, key_name: str | None = None) -> str:
        se = int(time.time()) + ttl_s
        sr = urllib.parse.quote(self.host, safe="")
        mac = hmac.new(base64.b64decode(key or self.key), f"{sr}\n{se}".encode("utf-8"), hashlib.sha256)
        sig = base64.b64encode(mac.digest()).decode("ascii")
        return (
            f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}"
            f"&se={se}&skn={key_name or self.key_name}"
        )

    def request(self, method: str, path: str, *, json_body=None, data=None, headers=None, params=None,
                token: str | None = None, timeout: float = 15):
        hdrs = {"Authorization": token or self.sas_token()}
        if headers:
            hdrs.update(headers)
        query = {"api-version": HUB_API_VERSION}
        if params:
            query.update(params)
        return self.session.request(method, f"{self.base_url}{path}", params=query, headers=hdrs,
                                    json=json_body, data=data, verify=self.ca_path, timeout=timeout)

    @staticmethod
    def _q(device_id: str) -> str:
        return urllib.parse.quote(device_id, safe="")

    # device identities
    def get_device(self, device_id: str):
        return self.request("GET", f"/devices/{self._q(device_id)}")

    def list_devices(self):
        return self.request("GET", "/devices")

    def put_device(self, device_id: str, body: dict, if_match: str | None = None):
        return self.request("PUT", f"/devices/{self._q(device_id)}", json_body=body,
                            headers={"If-Match": if_match} if if_match else None)

    def delete_device(self, device_id: str, if_match: str | None = None):
        return self.request("DELETE", f"/devices/{self._q(device_id)}",
                            headers={"If-Match": if_match} if if_match else None)

    # twins
    def get_twin(self, device_id: str):
        return self.request("GET", f"/twins/{self._q(device_id)}")

    def patch_twin(self, device_id: str, patch: dict, if_match: str | None = None):
        return self.request("PATCH", f"/twins/{self._q(device_id)}", json_body=patch,
                            headers={"If-Match": if_match} if if_match else None)

    # direct methods
    def invoke_method(self, device_id: str, method_name: str, payload=None, response_timeout_s: int = 5):
        body = {"methodName": method_name, "payload": payload, "responseTimeoutInSeconds": response_timeout_s}
        return self.request("POST", f"/twins/{self._q(device_id)}/methods", json_body=body,
                            timeout=response_timeout_s + 15)

    # cloud-to-device (Fleetgate extension of the REST API)
    def send_c2d(self, device_id: str, body: bytes | str, *, message_id: str | None = None,
                 correlation_id: str | None = None, content_type: str | None = None,
                 content_encoding: str | None = None, ttl_s: int | None = None,
                 properties: dict[str, str] | None = None):
        headers = {}
        for name, value in (("iothub-messageid", message_id), ("iothub-correlationid", correlation_id),
                            ("iothub-contenttype", content_type), ("iothub-contentencoding", content_encoding),
                            ("iothub-ttl", None if ttl_s is None else str(ttl_s))):
            if value is not None:
                headers[name] = value
        for name, value in (properties or {}).items():
            headers[f"iothub-app-{name}"] = value
        if isinstance(body, str):
            body = body.encode("utf-8")
        return self.request("POST", f"/devices/{self._q(device_id)}/messages/deviceBound", data=body,
                            headers=headers)

    # telemetry (Fleetgate extension: what Azure offers over the Event Hubs endpoint)
    def events(self, device_id: str | None = None, from_seq: int = 0) -> list[dict]:
        params = {"from": str(from_seq), "format": "json"}
        if device_id is not None:
            params["deviceId"] = device_id
        r = self.request("GET", "/messages/events", params=params)
        assert r.status_code == 200, f"GET /messages/events: {r.status_code} {r.text}"
        items = r.json()
        assert isinstance(items, list), items
        return items

    def wait_for_events(self, device_id: str, count: int, timeout: float = 10.0) -> list[dict]:
        """Events of one device once there are at least `count` (or whatever is there at the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            items = self.events(device_id)
            if len(items) >= count or time.monotonic() > deadline:
                return items
            time.sleep(0.1)


class CallOutcome:
    def __init__(self):
        self.result = None
        self.error: BaseException | None = None
        self.elapsed: float | None = None


def call_with_timeout(fn, *args, timeout: float = HUB_OP_TIMEOUT_S, what: str = "call", **kwargs) -> CallOutcome:
    """Run fn in a daemon thread; fail the test (instead of hanging) if it does not return in time."""
    outcome = CallOutcome()

    def run():
        t0 = time.monotonic()
        try:
            outcome.result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            outcome.error = e
        finally:
            outcome.elapsed = time.monotonic() - t0

    t = threading.Thread(target=run, name=f"call-{what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{what} did not return within {timeout}s", pytrace=False)
    return outcome


class HubDevice:
    """An IoTHubDeviceClient (MQTT) for one device, every call guarded by a timeout.

    The client connects to the server's loopback address (``gateway_hostname``) while its
    username and SAS token name the hub (``hostname`` = the assigned hub).
    """

    def __init__(self, server: "FleetgateServer", device_id: str, key: str, hub_hostname: str | None = None,
                 **client_kwargs):
        from azure.iot.device import IoTHubDeviceClient

        self.server = server
        self.device_id = device_id
        self.key = key
        client_kwargs.setdefault("connection_retry_interval", 1)
        self.client = IoTHubDeviceClient.create_from_symmetric_key(
            symmetric_key=key,
            hostname=hub_hostname or server.hub_hostname,
            device_id=device_id,
            server_verification_cert=server.ca_pem,
            gateway_hostname=server.address,
            **client_kwargs,
        )
        self._shut_down = False

    def try_call(self, method: str, *args, timeout: float = HUB_OP_TIMEOUT_S, **kwargs) -> CallOutcome:
        return call_with_timeout(getattr(self.client, method), *args, timeout=timeout,
                                 what=f"{self.device_id}.{method}()", **kwargs)

    def call(self, method: str, *args, timeout: float = HUB_OP_TIMEOUT_S, **kwargs):
        """The call's result; its exception is re-raised."""
        out = self.try_call(method, *args, timeout=timeout, **kwargs)
        if out.error is not None:
            raise out.error
        return out.result

    def connect(self):
        return self.call("connect")

    def send(self, message):
        return self.call("send_message", message)

    def shutdown(self):
        if not self._shut_down:
            self._shut_down = True
            call_with_timeout(self.client.shutdown, timeout=HUB_OP_TIMEOUT_S, what=f"{self.device_id}.shutdown()")


@pytest.fixture
def hub_devices():
    """Factory for HubDevice clients; every client is shut down when the test ends."""
    made: list[HubDevice] = []

    def make(server: "FleetgateServer", device_id: str, key: str, **kw) -> HubDevice:
        dev = HubDevice(server, device_id, key, **kw)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        try:
            dev.shutdown()
        except BaseException:  # noqa: BLE001 - best effort; a hung shutdown must not mask the test result
            pass


# --------------------------------------------------------------------------- DPS breadth (additions)
# Individual enrollments, several linked hubs, device payloads. Only additions: nothing above changes.


def _enrollment_path(registration_id: str) -> str:
    return f"/enrollments/{urllib.parse.quote(registration_id, safe='')}"


def _group_path(group_id: str) -> str:
    return f"/enrollmentGroups/{urllib.parse.quote(group_id, safe='')}"


class EnrollmentServiceApi(ServiceApi):
    """The DPS service API with individual enrollments, full-body group PUTs and record deletion."""

    @classmethod
    def of(cls, server: "FleetgateServer") -> "EnrollmentServiceApi":
        return cls(server.instance["serviceConnectionString"], server.ca_path)

    def put_enrollment(self, body: dict, etag: str | None = None):
        """PUT /enrollments/{registrationId} with a full enrollment body (If-Match when etag is given)."""
        return self.request("PUT", _enrollment_path(body["registrationId"]), json_body=body,
                            headers={"If-Match": etag} if etag else None)

    def get_enrollment(self, registration_id: str):
        return self.request("GET", _enrollment_path(registration_id))

    def delete_enrollment(self, registration_id: str, etag: str | None = None):
        return self.request("DELETE", _enrollment_path(registration_id),
                            headers={"If-Match": etag} if etag else None)

    def query_enrollments(self, page_size: int = 100):
        return self.request("POST", "/enrollments/query", json_body={"query": "SELECT * FROM enrollments"},
                            headers={"x-ms-max-item-count": str(page_size)})

    def bulk_enrollments(self, mode: str, enrollments: list[dict]):
        return self.request("POST", "/enrollments", json_body={"mode": mode, "enrollments": enrollments})

    def put_group_body(self, body: dict, etag: str | None = None):
        """PUT /enrollmentGroups/{id} with a full group body (allocation fields, twin, policies, ...)."""
        return self.request("PUT", _group_path(body["enrollmentGroupId"]), json_body=body,
                            headers={"If-Match": etag} if etag else None)

    def delete_registration(self, registration_id: str, etag: str | None = None):
        return self.request("DELETE", f"/registrations/{urllib.parse.quote(registration_id, safe='')}",
                            headers={"If-Match": etag} if etag else None)


def run_cli(server: "FleetgateServer", *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """`fleetgate <args> --data-dir <the server's data dir>`; fails the test on a non-zero exit."""
    cmd = [FLEETGATE_BIN, *args, "--data-dir", str(server.data_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, NO_COLOR="1"))
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc


def reload_instance(server: "FleetgateServer") -> dict:
    """instance.json read afresh (`fleetgate hub create` adds hubs to it while the server runs)."""
    server._instance = None
    return server.instance


def hub_service_for(server: "FleetgateServer", hub_hostname: str) -> HubServiceApi:
    """A hub service API client for one linked hub, from its connection string in instance.json."""
    for hub in reload_instance(server)["hubs"]:
        if hub["hostName"].lower() == hub_hostname.lower():
            return HubServiceApi(hub["connectionString"], server.ca_path, server.address, server.https_port)
    raise AssertionError(f"hub {hub_hostname!r} not in instance.json: {server.instance['hubs']}")


def register_device_with(host: str, id_scope: str, ca_pem: str, registration_id: str, key: str, *,
                         payload=None, timeout: float = REGISTER_TIMEOUT_S) -> RegisterOutcome:
    """Like register_device, with an optional `provisioning_payload` sent along with the request."""
    from azure.iot.device import ProvisioningDeviceClient

    outcome = RegisterOutcome()

    def run():
        t0 = time.monotonic()
        try:
            client = ProvisioningDeviceClient.create_from_symmetric_key(
                provisioning_host=host,
                registration_id=registration_id,
                id_scope=id_scope,
                symmetric_key=key,
                server_verification_cert=ca_pem,
            )
            if payload is not None:
                client.provisioning_payload = payload
            outcome.result = client.register()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            outcome.error = e
        finally:
            outcome.elapsed = time.monotonic() - t0

    t = threading.Thread(target=run, name=f"register-{registration_id}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"register({registration_id!r}) did not return within {timeout}s", pytrace=False)
    return outcome
