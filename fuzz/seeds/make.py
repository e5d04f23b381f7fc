#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/corpus/<target>/): a few real inputs of
each kind, hostile ones included, for libFuzzer to start from. Run it again after
changing it; its output is committed."""
import json
import pathlib
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent / "corpus"


def write(target, name, data):
    d = ROOT / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


# imds_path: request paths.
for i, p in enumerate([
    "/latest/meta-data/ami-id",
    "/latest/meta-data/placement/availability-zone",
    "/latest/meta-data/iam/security-credentials/",
    "/latest/meta-data/iam/security-credentials/my-role",
    "/latest/meta-data/iam/info",
    "/latest/user-data",
    "/latest/meta-data/../user-data",
    "/latest/meta-data/%2e%2e/user-data",
    "/latest//meta-data///local-ipv4",
    "/latest/dynamic/instance-identity/document",
    "/latest/dynamic/instance-identity/pkcs7",
    "/latest/meta-data/tags/instance/Name",
    "/latest/api/token",
    "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    "/latest/meta-data/network/interfaces/macs/0e:00:00:00:00:01/vpc-id",
]):
    write("imds_path", f"seed-{i:02}", p)

# imds_token: ttl \0 ip \0 now \0 token.
for i, (ttl, ip, now, token) in enumerate([
    (b"21600", b"\x0a\x00\x00\x01", b"\x01\x02\x03\x04", b"v1.1800000000.AAAA"),
    (b" 60 ", b"\xfd" + b"\x00" * 15, b"", b""),
    (b"0", b"", b"\xff", b"v1.99999999999999999999.x"),
    (b"21601", b"\x7f\x00\x00\x01", b"\x00", b"v1..."),
    (b"+1", b"\x0a\x00\x00\x02", b"\x10", b"  v1.1.YWJj  "),
]):
    write("imds_token", f"seed-{i:02}", ttl + b"\0" + ip + b"\0" + now + b"\0" + token)

# namespace_policy: which \0 permitted \0 allowed-roles \0 role.
for i, (which, permitted, allowed, role) in enumerate([
    (1, "arn:aws:iam::123456789012:role/team-a-.*", "", "team-a-reader"),
    (1, "arn:aws:iam::123456789012:role/team-a-x)|(.*", "", "admin"),
    (1, "team-.*", "", "team-b"),
    (2, "", '["team-a-*", "arn:aws:iam::123456789012:role/ops/*"]', "ops/deploy"),
    (2, "", '["*"]', "arn:aws:iam::999999999999:role/Other"),
    (3, "(?i)ARN:AWS:IAM::123456789012:ROLE/(A|B)", '["/path/x*"]', "path/xy"),
    (1, "(?x) arn:aws:iam::123456789012:role/a #", "", "a"),
]):
    write("namespace_policy", f"seed-{i:02}",
          bytes([which]) + b"\0" + permitted.encode() + b"\0" + allowed.encode() + b"\0" + role.encode())

# kube_objects: a kind byte (even: Pod, odd: Namespace), then the object's JSON.
pods = [
    {"metadata": {"namespace": "ns", "name": "web", "uid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
                  "annotations": {"iam.amazonaws.com/role": "web", "other": "x"},
                  "ownerReferences": [{"kind": "ReplicaSet", "name": "web-1", "apiVersion": "apps/v1", "uid": "u"}]},
     "spec": {"nodeName": "node-a", "serviceAccountName": "default", "containers": [{"name": "c"}]},
     "status": {"phase": "Running", "podIP": "10.0.0.7", "podIPs": [{"ip": "10.0.0.7"}, {"ip": "fd00::7"}]}},
    {"metadata": {"namespace": "kube-system", "name": "static-node-a",
                  "annotations": {"kubernetes.io/config.mirror": "abc", "iam.amazonaws.com/role": "admin"},
                  "ownerReferences": [{"kind": "Node", "name": "node-a", "apiVersion": "v1", "uid": "n"}]},
     "spec": {"nodeName": "node-a", "hostNetwork": True},
     "status": {"phase": "Running", "podIP": "192.0.2.1"}},
    {"metadata": {"namespace": "ns", "name": "done"}, "spec": {"nodeName": "node-a"},
     "status": {"phase": "Succeeded", "podIP": "10.0.0.8"}},
    {"metadata": {"namespace": "ns", "name": "odd", "annotations": None},
     "spec": None, "status": {"podIPs": [{"ip": "not-an-ip"}, {}, {"ip": "::ffff:10.0.0.9"}]}},
]
for i, p in enumerate(pods):
    write("kube_objects", f"pod-{i:02}", b"\x00" + json.dumps(p).encode())
namespaces = [
    {"metadata": {"name": "team-a", "annotations": {"iam.amazonaws.com/permitted": "arn:aws:iam::1:role/a-.*"}}},
    {"metadata": {"name": "team-b", "annotations": {"iam.amazonaws.com/allowed-roles": '["b-*"]'}}},
    {"metadata": {"name": "bare"}},
]
for i, n in enumerate(namespaces):
    write("kube_objects", f"namespace-{i:02}", b"\x01" + json.dumps(n).encode())


# feed_messages: length-delimited NodeUpdate messages (protobuf, encoded by hand).
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(tag, wire, payload):
    key = varint((tag << 3) | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def s(tag, text):
    return field(tag, 2, text.encode())


def credentials(expiry):
    return s(1, "ASIAEXAMPLE") + s(2, "secret") + s(3, "token") + field(4, 0, varint(expiry & (2**64 - 1)))


def pod(uid, ips, role="", denial=None, creds=None, version=1):
    m = s(1, uid) + s(2, "ns") + s(3, "pod-" + uid)
    for ip in ips:
        m += s(4, ip)
    m += field(5, 0, varint(version))
    if role:
        m += s(6, role)
    if denial:
        m += field(7, 2, s(1, denial) + s(2, "why"))
    if creds is not None:
        m += field(8, 2, credentials(creds))
    return m


def update(pods=(), removed=(), synced=False):
    m = b"".join(field(1, 2, p) for p in pods)
    m += b"".join(s(2, r) for r in removed)
    if synced:
        m += field(3, 0, varint(1))
    m += field(4, 0, varint(5000))
    return varint(len(m)) + m


ROLE = "arn:aws:iam::123456789012:role/web"
write("feed_messages", "seed-00", update([pod("a", ["10.0.0.1"], ROLE, creds=1_795_700_000)], synced=True))
write("feed_messages", "seed-01",
      update([pod("a", ["10.0.0.1"], ROLE), pod("b", ["10.0.0.2", "fd00::2"], denial="forbidden")], synced=True)
      + update(removed=["a"]) + update([pod("c", ["10.0.0.1"], ROLE, creds=1_795_700_000)]))
write("feed_messages", "seed-02",
      update([pod("a", ["10.0.0.1"], ROLE), pod("b", ["10.0.0.1"], ROLE)], synced=True)
      + update([pod("a", ["10.0.0.3"], ROLE, version=2)]))
write("feed_messages", "seed-03", update([pod("x", ["::ffff:10.0.0.4"], "not-an-arn", creds=-1)]))
write("feed_messages", "seed-04", update())
# Found by the target: an expiry after 9999 made the agent panic formatting its document.
write("feed_messages", "regress-expiry-after-9999",
      update([pod("a", ["10.0.0.1"], ROLE, creds=2**63 - 1)], synced=True))

# pod_identity_request: now \0 method \0 request target \0 Host \0 Authorization, where an
# Authorization of `@` and JSON is made into a JWT around those claims by the target.
NOW = 1_795_651_200
CLAIMS = {"aud": ["pods.eks.amazonaws.com"], "exp": NOW + 86_400, "iat": NOW, "nbf": NOW,
          "iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:payments:ledger",
          "kubernetes.io": {"namespace": "payments", "pod": {"name": "ledger", "uid": "u"},
                            "serviceaccount": {"name": "ledger", "uid": "s"}}}


def b64url(data):
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims):
    return "eyJhbGciOiJSUzI1NiIsImtpZCI6IngifQ." + b64url(json.dumps(claims).encode()) + ".c2lnbmF0dXJl"


for i, (now, method, target, host, authorization) in enumerate([
    (NOW, "GET", "/v1/credentials", "169.254.170.23", "@" + json.dumps(CLAIMS)),
    (NOW, "GET", "/v1/credentials", "[fd00:ec2::23]:80", jwt(CLAIMS)),
    (NOW, "GET", "http://169.254.170.23/v1/credentials", "", jwt(CLAIMS)),
    (NOW + 86_400, "GET", "/v1/credentials", "169.254.170.23:80", "@" + json.dumps(CLAIMS)),
    (NOW - 1, "GET", "/v1/credentials", "169.254.170.23", "@" + json.dumps(CLAIMS)),
    (NOW, "GET", "/v1/credentials", "169.254.170.23", '@{"exp": 1.8e9, "nbf": "later"}'),
    (NOW, "GET", "/v1/credentials", "169.254.169.254", jwt(CLAIMS)),
    (NOW, "GET", "/v1/credentials", "fd00:ec2::23", "  " + jwt(CLAIMS) + "\t"),
    (NOW, "POST", "/v1/credentials?x=1", "169.254.170.23", jwt(CLAIMS)),
    (NOW, "GET", "/v1/credentials/../credentials", "169.254.170.23", "Bearer " + jwt(CLAIMS)),
    (NOW, "GET", "/v1/credentials", "169.254.170.23", jwt(CLAIMS) + ".extra"),
    (NOW, "GET", "/v1/credentials", "169.254.170.23", "a.e30=.c"),
    (NOW, "GET", "/v1/credentials", "[::ffff:169.254.170.23]", "@[1, 2]"),
]):
    write("pod_identity_request", f"seed-{i:02}",
          "\0".join([str(now), method, target, host, authorization]))
