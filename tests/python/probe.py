"""Checks a running service with third-party clients, the way operators'
tools would: gRPC health (grpcio-health-checking), server reflection v1alpha
(grpcio-reflection) and v1, and Prometheus metrics (prometheus-client's
parser). Prints one line per finding; exits non-zero on the first failure.

    python probe.py health ADDR SERVICE...             # each must be SERVING
    python probe.py reflection ADDR SERVICE...         # each must be listed, v1alpha and v1
    python probe.py metrics URL NAME[{label=value}]=VALUE...   # sample checks ('>=' allowed)
    python probe.py garbage ADDR USER                  # malformed frames on a Session stream
"""

import sys
import urllib.request

import grpc


def health(addr, services):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in services:
            name = "" if name == "-" else name
            status = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            label = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            print(f"health {addr} {name or '(overall)'}: {label}")
            if label != "SERVING":
                raise SystemExit(1)


def reflection(addr, services):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(addr) as ch:
        # v1alpha, through grpcio-reflection's own client.
        db = ProtoReflectionDescriptorDatabase(ch)
        listed = set(db.get_services())
        print(f"reflection v1alpha {addr}: {sorted(listed)}")
        pool = DescriptorPool(db)
        for name in services:
            if name not in listed:
                raise SystemExit(f"{name} not listed")
            methods = [m.name for m in pool.FindServiceByName(name).methods]
            print(f"  {name}: {methods}")
        # v1: the same messages on the v1 service path.
        call = ch.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        reply = next(iter(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)))
        v1 = {s.name for s in reply.list_services_response.service}
        print(f"reflection v1 {addr}: {sorted(v1)}")
        missing = set(services) - v1
        if missing:
            raise SystemExit(f"v1 does not list {missing}")


def metrics(url, checks):
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    print(f"metrics {url}: {len(samples)} samples")
    for check in checks:
        at_least = ">=" in check
        name, want = check.split(">=" if at_least else "=", 1) if at_least else check.rsplit("=", 1)
        got = samples.get(name)
        ok = got is not None and (got >= float(want) if at_least else got == float(want))
        print(f"  {name} = {got} (want {'>=' if at_least else ''}{want})")
        if not ok:
            raise SystemExit(f"metric check failed: {check}; have: {sorted(samples)}")


def garbage(addr, args):
    """Sends bytes that are not a ClientMessage on a Session stream (as a
    development-identity user) and prints the status the server ends it
    with; the server must end that stream, not fall over."""
    (user,) = args
    with grpc.insecure_channel(addr) as ch:
        call = ch.stream_stream(
            "/videocall.v1.CallService/Session",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        frames = [b"\xff\xff\xff\xff\x0f", b"\x0a\x80\x80\x80\x80\x80\x80", b"\x12\x05ab"]
        try:
            for _ in call(iter(frames), metadata=[("x-videocall-user", user)], timeout=5):
                pass
            print("garbage: stream ended cleanly")
        except grpc.RpcError as e:
            print(f"garbage: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    {"health": health, "reflection": reflection, "metrics": metrics, "garbage": garbage}[sys.argv[1]](sys.argv[2], sys.argv[3:])
