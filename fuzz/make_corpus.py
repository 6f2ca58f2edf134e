#!/usr/bin/env python3
"""Writes the seeds (fuzz/corpus/<target>/seed-*) from the SDK wire examples in
shared/docs/wire-examples.md: real CONNECT usernames and tokens, register and telemetry
PUBLISHes, property bags, enrollment and webhook JSON. Re-run after changing a seed; libFuzzer
finds the rest. The X.509 seeds (seed-*.pem/.der) were made once with openssl (a P-256 root,
intermediate and clientAuth leaf, a self-signed device certificate, an RSA certificate, all valid
2026-2122) and are kept as they are.

The other files in fuzz/corpus are what fuzzing found, minimized: inputs of at most 512 bytes
(1 KB for the smaller targets) from an hour of runs, reduced to a set that covers the same edges
(libFuzzer -set_cover_merge=1 -use_counters=0). regression-* inputs once broke an invariant.
"""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")

A = {
    "a1": "SharedAccessSignature sr=0ne00000001%2Fregistrations%2Fdev-001&sig=fN4FZ1Kio8sXHI9yXOBL8ZWQnYrB7aae8QoYjB83HDo%3D&se=1700000000",
    "a2": "SharedAccessSignature sr=0ne00000001/registrations/dev-001&sig=1wVj2FTyuxx%2F6HVyW2mkJcCw793AL3dzjlNscKY39kU%3D&skn=registration&se=1700000000",
    "a3": "SharedAccessSignature sr=0ne00000001%2fregistrations%2fdev-001&sig=Q7fh4WtS8mZopQTHyj4aCkTAjnAYfHIIUtXno7saUbU%3d&se=1700000000&skn=registration",
    "a4": "SharedAccessSignature sr=0ne00000001/registrations/dev-001&sig=1wVj2FTyuxx%2F6HVyW2mkJcCw793AL3dzjlNscKY39kU%3D&se=1700000000&skn=",
    "a5": "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev-001&sig=dH%2FBOMR1yoMPfNtctGZIUYUiSuahGqtr5h9gHwcq60Q%3D&se=1700000000",
    "a6": "SharedAccessSignature sr=myhub.azure-devices.net/devices/dev-001&sig=vvGm%2bhOaoxBCwAMgc7JU600s12zw%2ftk6Ysl8V42qOYU%3d&se=1700000000",
    "a7": "SharedAccessSignature sr=mydps.azure-devices-provisioning.net&sig=3XGoBpU8zs%2F7bx5bdhDa5AV0WaK5nfbAcOlMYP2RfNk%3D&skn=provisioningserviceowner&se=1700000000",
}

DPS_USER_PY = "0ne00000001/registrations/dev-001/api-version=2019-03-31&ClientVersion=azure-iot-device-provisioning-py%2F2.14.0%283.11.7%3BLinux%206.1.0%3Bx86_64%29"
DPS_USER_NODE = "0ne00000001/registrations/dev-001/api-version=2019-03-31&ClientVersion=azure-iot-provisioning-device%2F1.9.1"
DPS_USER_C = "0ne00000001/registrations/dev-001/api-version=2021-06-01&ClientVersion=1.15.0"
HUB_USER_PY = "myhub.azure-devices.net/dev-001/?api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0%283.11.7%3BLinux%206.1.0%3Bx86_64%29"
HUB_USER_NODE = "myhub.azure-devices.net/dev-001/?api-version=2021-04-12&model-id=dtmi:com:example:Thermostat;1&DeviceClientType=azure-iot-device%2F1.18.4%20(node%20v20.20.2%3B%20Debian%2012%3B%20x64)"
REGISTER_TOPIC = "$dps/registrations/PUT/iotdps-register/?$rid=6f1d3c0e-0b4e-4a53-9a4c-0d2f1d5b8a10"
STATUS_TOPIC = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=5&operationId=5.0123456789abcdef.3f2b6c1e-8d1a-4e2b-9c55-2a7e9b1d0c11"
BAG_PY = "%24.mid=m%201&%24.ct=application%2Fjson&%24.ce=utf-8&temp%20alert=a%2Fb%26c&x=1"
BAG_C2D = "%24.mid=c2d-42&%24.to=%2Fdevices%2Fdev-001%2Fmessages%2FdeviceBound&%24.ct=text%2Fplain&priority=high"
TELEMETRY_TOPIC = "devices/dev-001/messages/events/" + BAG_PY

GROUP = {
    "enrollmentGroupId": "grp-1",
    "attestation": {"type": "symmetricKey", "symmetricKey": {
        "primaryKey": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        "secondaryKey": "HxwdHh8ODxAREhMUFRYXGBkaGwABAgMEBQYHCAkKCww="}},
    "capabilities": {"iotEdge": False},
    "provisioningStatus": "enabled",
    "reprovisionPolicy": {"updateHubAssignment": True, "migrateDeviceData": True},
    "allocationPolicy": "hashed",
    "iotHubs": ["myhub.azure-devices.net"],
    "initialTwin": {"tags": {"site": "lab"}, "properties": {"desired": {"interval": 30}}},
}


def compact(v):
    return json.dumps(v, separators=(",", ":")).encode()


# --- MQTT 3.1.1 encoding -------------------------------------------------------------------
def varint(n):
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def packet(kind_flags, body):
    return bytes([kind_flags]) + varint(len(body)) + body


def connect(client_id, username, password, clean=False, keep_alive=60, level=4):
    flags = 0x80 | 0x40 | (0x02 if clean else 0)
    body = mstr("MQTT") + bytes([level, flags]) + struct.pack(">H", keep_alive)
    body += mstr(client_id) + mstr(username) + mstr(password)
    return packet(0x10, body)


def publish(topic, payload, qos=1, pkid=2):
    body = mstr(topic) + (struct.pack(">H", pkid) if qos else b"") + payload
    return packet(0x30 | (qos << 1), body)


def subscribe(pkid, *filters):
    body = struct.pack(">H", pkid) + b"".join(mstr(f) + b"\x01" for f in filters)
    return packet(0x82, body)


def seeds():
    s = {}
    # MQTT conversations, as each SDK opens them (wire-examples B, C, F).
    dps_py = connect("dev-001", DPS_USER_PY, A["a1"])
    s["mqtt_packet"] = {
        "python-dps-register": dps_py + subscribe(1, "$dps/registrations/res/#")
        + publish(REGISTER_TOPIC, b'{"payload": null, "registrationId": "dev-001"}')
        + publish(STATUS_TOPIC, b" ", pkid=3) + packet(0xE0, b""),
        "csharp-dps-empty-body": connect("dev-001", DPS_USER_NODE, A["a3"], clean=True)
        + publish("$dps/registrations/PUT/iotdps-register/?$rid=2", b"", pkid=2),
        "c-dps-qos0": connect("dev-001", DPS_USER_C, A["a3"], clean=True, keep_alive=0)
        + publish("$dps/registrations/PUT/iotdps-register/?$rid=3", b'{"registrationId":"dev-001"}', qos=0),
        "python-hub-telemetry": connect("dev-001", HUB_USER_PY, A["a5"])
        + subscribe(1, "devices/dev-001/messages/devicebound/#", "$iothub/twin/res/#",
                    "$iothub/twin/PATCH/properties/desired/#", "$iothub/methods/POST/#")
        + publish(TELEMETRY_TOPIC, b"hi") + packet(0xC0, b"")
        + publish("$iothub/twin/PATCH/properties/reported/?$rid=11", b'{"fw":"1.1","battery":null}', pkid=4)
        + publish("$iothub/methods/res/200/?$rid=1", b'{"result":"ok"}', pkid=5)
        + packet(0x40, struct.pack(">H", 7)),
        "mqtt5-connect": connect("dev-001", HUB_USER_NODE, A["a6"], level=5),
    }
    s["dps_topics"] = {
        "username-python": DPS_USER_PY.encode(),
        "username-c": DPS_USER_C.encode(),
        "register-python": REGISTER_TOPIC.encode() + b"\0" + b'{"payload": {"model": "x1"}, "registrationId": "dev-001"}',
        "status-poll": STATUS_TOPIC.encode() + b"\0 ",
        "status-encoded": b"$dps/registrations/GET/iotdps-get-operationstatus/?$rid=a%2Db&operationId=5.0123.abc%3Ad\0{}",
    }
    s["hub_topics"] = {
        "username-python": HUB_USER_PY.encode(),
        "username-node": HUB_USER_NODE.encode(),
        "telemetry-python": TELEMETRY_TOPIC.encode(),
        "twin-get": b"$iothub/twin/GET/?$rid=8c7b0e62-3b7e-4a31-9f1c-44f0b2c1a001",
        "twin-reported": b"$iothub/twin/PATCH/properties/reported/?$rid=11aa",
        "method-response": b"$iothub/methods/res/200/?$rid=1",
        "c2d-filter": b"devices/dev-001/messages/devicebound/#",
        "desired-filter": b"$iothub/twin/PATCH/properties/desired/#",
    }
    s["property_bag"] = {
        "python-f2": BAG_PY.encode(),
        "c2d-f3": BAG_C2D.encode(),
        "raw-dollar-and-flags": b"$.ct=application%2Fjson&flag&empty=&a+b=c+d",
    }
    s["sas_token"] = {k: v.encode() for k, v in A.items()}
    s["sas_token"]["build-parts"] = b"0ne00000001/registrations/dev-001\nregistration\nkey-bytes"
    s["connection_string"] = {
        "dps-service": b"HostName=localhost:8443;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM=",
        "hub-service": b"HostName=myhub.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    }
    s["ids"] = {
        "tutorial-id": b"sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
        "scope": b"0ne0004E52F",
        "punctuation": b"A.b_c:d-",
    }
    individual = {"registrationId": "dev-002", "deviceId": "dev-002",
                  "attestation": {"type": "symmetricKey"}, "allocationPolicy": "static",
                  "iotHubHostName": "hub-a.example", "optionalDeviceInformation": {"model": "x1"}}
    custom = dict(GROUP, allocationPolicy="custom", iotHubs=["hub-a.example", "hub-b.example"],
                  customAllocationDefinition={"webhookUrl": "https://alloc.example/api/allocate?code=x",
                                              "apiVersion": "2021-10-01"})
    s["enrollment_json"] = {
        "group-g1": b"grp-1\n" + compact(GROUP),
        "group-generated-keys": b"grp-2\n" + compact({"attestation": {"type": "symmetricKey"}}),
        "group-custom": b"grp-3\n" + compact(custom),
        "individual": b"dev-002\n" + compact(individual),
    }
    root = os.path.join(ROOT, "x509_certificate")
    pems = sorted(f for f in os.listdir(root) if f.endswith(".pem")) if os.path.isdir(root) else []
    for name in ("seed-root.pem", "seed-int.pem"):
        if name in pems:
            cert = open(os.path.join(root, name)).read()
            s["enrollment_json"]["x509-" + name[5:-4]] = b"grp-x\n" + compact(
                {"attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": cert}}}}})
    if "seed-leaf.pem" in pems:
        cert = open(os.path.join(root, "seed-leaf.pem")).read()
        s["enrollment_json"]["x509-individual"] = b"dev-001\n" + compact(
            {"registrationId": "dev-001", "attestation": {"type": "x509", "x509": {
                "clientCertificates": {"primary": {"certificate": cert}}}}})
    s["twin_patch"] = {
        "initial-then-patches": compact(GROUP["initialTwin"]) + b"\0" + b'{"fw":"1.1","battery":null}'
        + b"\0" + b'{"interval":60,"$version":5}' + b"\0" + b'{"site":null,"floor":{"n":2}}'
        + b"\0" + b'{"net":{"ip":"10.0.0.2","mask":null}}',
        "no-initial": b"\0" + b'{"a":{"b":{"c":[1,2,{"d":"e"}]}}}',
    }
    s["service_query"] = {
        "star": b"*",
        "select": b"SELECT * FROM enrollmentGroups",
        "where": b"SELECT * FROM devices WHERE tags.site = 'north' AND status != \"disabled\" AND n = 1.5",
        "where-doc": b"select * from enrollments where attestation.type = 'x509'\0"
        + compact({"attestation": {"type": "x509"}}),
        "refused-or": b"SELECT * FROM devices WHERE a = 'b' OR c = null",
    }
    s["custom_allocation"] = {
        "h-answer": compact({"iotHubHostName": "hub-b.example",
                             "initialTwin": {"tags": {"model": "x1"}, "properties": {"desired": {"interval": 15}}},
                             "payload": {"hubTier": "gold"}}),
        "lower-case-member": b'{"iotHubHostname":"HUB-B.example","payload":null}',
    }
    s["http_path"] = {
        "group": b"/enrollmentGroups/grp-1",
        "group-query": b"/enrollmentGroups/query",
        "attestation": b"/enrollmentgroups/grp-1/attestationMechanism",
        "registration-query": b"/registrations/grp-1/query",
        "dps-device": b"/0ne00000001/registrations/dev-001/register",
        "operation": b"/0ne00000001/registrations/dev-001/operations/5.0123.abc",
        "c2d": b"/devices/dev-001/messages/deviceBound",
        "method": b"/twins/dev-001/methods",
        "events": b"/messages/Events",
    }
    return s


def main():
    for target, files in seeds().items():
        d = os.path.join(ROOT, target)
        os.makedirs(d, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(d, "seed-" + name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
