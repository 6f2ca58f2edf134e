"""A device program as firmware is written: Azure's global provisioning name built in, no
gateway override. It provisions with a group-derived symmetric key, connects to the hub it is
assigned, sends one message and prints one JSON line with what happened.

Run by test_firmware_names.py inside a private mount namespace whose /etc/hosts points Azure's
names at a Fleetgate on loopback, the way an operator overrides them for existing firmware. Not a
test module (pytest collects only test_*.py).

Usage: firmware_device.py ID_SCOPE REGISTRATION_ID DEVICE_KEY CA_PEM_PATH MESSAGE_ID
"""

from __future__ import annotations

import json
import socket
import sys

from azure.iot.device import IoTHubDeviceClient, Message, ProvisioningDeviceClient

GLOBAL_ENDPOINT = "global.azure-devices-provisioning.net"  # as hard-coded in firmware


def resolve(name: str) -> str | None:
    try:
        return socket.gethostbyname(name)
    except OSError:
        return None


def main() -> int:
    id_scope, registration_id, key, ca_path, message_id = sys.argv[1:6]
    with open(ca_path, encoding="ascii") as f:
        ca_pem = f.read()
    report: dict = {"resolved": {GLOBAL_ENDPOINT: resolve(GLOBAL_ENDPOINT)}}
    provisioning = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=GLOBAL_ENDPOINT,
        registration_id=registration_id,
        id_scope=id_scope,
        symmetric_key=key,
        server_verification_cert=ca_pem,
    )
    result = provisioning.register()
    state = result.registration_state
    report.update(status=result.status, assigned_hub=state.assigned_hub, device_id=state.device_id)
    if result.status != "assigned":
        print(json.dumps(report), flush=True)
        return 1
    report["resolved"][state.assigned_hub] = resolve(state.assigned_hub)
    # The hub name registration returned is the one dialled: no gateway_hostname.
    device = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=key,
        hostname=state.assigned_hub,
        device_id=state.device_id,
        server_verification_cert=ca_pem,
        connection_retry=False,
    )
    try:
        device.connect()
        device.send_message(Message(json.dumps({"firmware": "unchanged"}), message_id=message_id,
                                    content_encoding="utf-8", content_type="application/json"))
        report["sent"] = True
    finally:
        device.shutdown()
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
