"""An example video-call client in Python, on generated stubs.

    python client.py --stubs gen --url 127.0.0.1:50051 --user bob answer [--reject CODE]
    python client.py --stubs gen --url 127.0.0.1:50051 --user alice call bob

`answer` waits for one call and accepts it (or rejects it with CODE), then
waits for the call to end. `call` dials a peer and, once the call has
started, hangs up. Every control result and event is printed as one line;
the process exits when its call is over.

It logs in with the development identity (`x-videocall-user` metadata),
which the call service accepts only with --dev-identity.
"""

import argparse
import itertools
import queue
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stubs", type=Path, required=True)
    parser.add_argument("--url", default="127.0.0.1:50051", help="host:port of the client API")
    parser.add_argument("--user", required=True)
    sub = parser.add_subparsers(dest="mode", required=True)
    answer = sub.add_parser("answer")
    answer.add_argument("--reject", type=int, default=0, help="reject with this code instead of accepting")
    call = sub.add_parser("call")
    call.add_argument("peer")
    args = parser.parse_args()

    sys.path.insert(0, str(args.stubs))
    import grpc
    from videocall.v1 import call_pb2, call_pb2_grpc, types_pb2

    T = types_pb2.EventType
    outbox: "queue.Queue" = queue.Queue()
    seq = itertools.count(1)

    def requests():
        while (msg := outbox.get()) is not None:
            yield msg

    def send(event_type, peer, code=0, flags=0, param=0, user_str=""):
        control = call_pb2.CallControl(
            seq=next(seq), event_type=event_type, peer_user_id=peer,
            error_code=code, flags=flags, param=param, user_str=user_str,
        )
        outbox.put(call_pb2.ClientMessage(control=control))

    channel = grpc.insecure_channel(args.url)
    stub = call_pb2_grpc.CallServiceStub(channel)
    responses = stub.Session(requests(), metadata=[("x-videocall-user", args.user)])
    first = next(responses)
    print(f"READY user={first.connected.user_id}", flush=True)

    if args.mode == "call":
        send(T.EVENT_TYPE_REQUEST, args.peer, flags=0x03, user_str=f"{args.user} from Python")

    try:
        for msg in responses:
            kind = msg.WhichOneof("kind")
            if kind == "result":
                print(f"RESULT seq={msg.result.seq} code={msg.result.code}", flush=True)
                continue
            if kind != "event":
                continue
            e = msg.event
            name = T.Name(e.event_type).removeprefix("EVENT_TYPE_")
            print(f"EVENT {name} peer={e.peer_user_id} code={e.error_code} param={e.param}", flush=True)
            if e.event_type == T.EVENT_TYPE_REQUEST and args.mode == "answer":
                send(T.EVENT_TYPE_REPLY, e.peer_user_id, code=args.reject)
            elif e.event_type == T.EVENT_TYPE_REPLY and e.error_code != 0:
                break  # the call did not start
            elif e.event_type == T.EVENT_TYPE_START and args.mode == "call":
                send(T.EVENT_TYPE_FINISH, e.peer_user_id)
            elif e.event_type == T.EVENT_TYPE_FINISH:
                break
    finally:
        outbox.put(None)
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
