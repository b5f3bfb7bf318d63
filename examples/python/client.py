"""An example video-call client in Python, on generated stubs.

    python client.py --stubs gen --url 127.0.0.1:50051 --user bob answer [--reject CODE]
    python client.py --stubs gen --url 127.0.0.1:50051 --user alice call bob [--hold SECONDS]
    python client.py --stubs gen --token-command "CMD" answer
    python client.py --stubs gen --token-file PATH call bob --hold 600

`answer` waits for one call and accepts it (or rejects it with CODE), then
waits for the call to end. `call` dials a peer and, once the call has
started, hangs up (after SECONDS with --hold). Every control result and
event is printed as one line; the process exits when its call is over, or
with status 1 when its stream ends with an error (printed as one
`STREAM-ERROR code=... details=...` line).

Identity: with --token-command (a shell command printing a fresh token on
stdout) or --token-file (a file holding one), it logs in with that JWT
(`authorization: Bearer <token>` metadata; --user is then optional: the
token names the user). Otherwise it uses the development identity
(`x-videocall-user` metadata), which the call service accepts only with
--dev-identity.

A token expires; the stream would end with it. When the server asks for a
new one (`RefreshDue`, printed as `REFRESH-DUE expires_at_ms=...`), the
client runs the command again (or re-reads the file) and sends the token
in a `TokenRefresh` on the same stream; the answer is printed as
`REFRESH-RESULT seq=... code=... expires_at_ms=...` (with `message=...` when
refused). A token that cannot be had, or that is the one the stream already
has, is printed as `REFRESH-ERROR reason=...` and nothing is sent: the
stream then ends at expiry (UNAUTHENTICATED).
"""

import argparse
import itertools
import queue
import subprocess
import sys
import threading
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stubs", type=Path, required=True)
    parser.add_argument("--url", default="127.0.0.1:50051", help="host:port of the client API")
    parser.add_argument("--user", help="the development identity (needed without a token)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--token-command", metavar="CMD",
                        help="shell command printing a fresh token on stdout; run at connect and on every RefreshDue")
    source.add_argument("--token-file", type=Path, metavar="PATH",
                        help="file holding a token; re-read at connect and on every RefreshDue")
    sub = parser.add_subparsers(dest="mode", required=True)
    answer = sub.add_parser("answer")
    answer.add_argument("--reject", type=int, default=0, help="reject with this code instead of accepting")
    call = sub.add_parser("call")
    call.add_argument("peer")
    call.add_argument("--hold", type=float, default=0.0, metavar="SECONDS",
                      help="after START, wait this long before hanging up")
    args = parser.parse_args()
    with_token = args.token_command is not None or args.token_file is not None
    if not with_token and not args.user:
        parser.error("--user is needed without --token-command or --token-file")

    sys.path.insert(0, str(args.stubs))
    import grpc
    from videocall.v1 import call_pb2, call_pb2_grpc, types_pb2

    T = types_pb2.EventType
    outbox: "queue.Queue" = queue.Queue()
    seq = itertools.count(1)
    printing = threading.Lock()

    def say(line: str) -> None:
        with printing:
            print(line, flush=True)

    def fresh_token() -> str:
        """A token from the command or the file; raises with why not."""
        if args.token_command is not None:
            done = subprocess.run(args.token_command, shell=True, stdout=subprocess.PIPE,
                                  text=True, timeout=30)
            if done.returncode != 0:
                raise RuntimeError(f"token command exited with {done.returncode}")
            token = done.stdout.strip()
        else:
            token = args.token_file.read_text().strip()
        if not token:
            raise RuntimeError("empty token")
        return token

    def requests():
        while (msg := outbox.get()) is not None:
            yield msg

    def send(event_type, peer, code=0, flags=0, param=0, user_str=""):
        control = call_pb2.CallControl(
            seq=next(seq), event_type=event_type, peer_user_id=peer,
            error_code=code, flags=flags, param=param, user_str=user_str,
        )
        outbox.put(call_pb2.ClientMessage(control=control))

    current = {"token": None}

    def refresh() -> None:
        """On RefreshDue (in a thread of its own, so events keep flowing)."""
        try:
            token = fresh_token()
        except Exception as e:  # noqa: BLE001 - any failure is reported the same way
            say(f"REFRESH-ERROR reason={e}")
            return
        if token == current["token"]:
            say("REFRESH-ERROR reason=token unchanged")
            return
        current["token"] = token
        outbox.put(call_pb2.ClientMessage(refresh=call_pb2.TokenRefresh(seq=next(seq), token=token)))

    if with_token:
        try:
            current["token"] = fresh_token()
        except Exception as e:  # noqa: BLE001
            raise SystemExit(f"cannot get a token: {e}")
        metadata = [("authorization", f"Bearer {current['token']}")]
    else:
        metadata = [("x-videocall-user", args.user)]

    channel = grpc.insecure_channel(args.url)
    stub = call_pb2_grpc.CallServiceStub(channel)
    hangup = None
    try:
        responses = stub.Session(requests(), metadata=metadata)
        first = next(responses)
        me = first.connected.user_id
        say(f"READY user={me}")

        if args.mode == "call":
            send(T.EVENT_TYPE_REQUEST, args.peer, flags=0x03, user_str=f"{me} from Python")

        for msg in responses:
            kind = msg.WhichOneof("kind")
            if kind == "result":
                say(f"RESULT seq={msg.result.seq} code={msg.result.code}")
                continue
            if kind == "refresh_due":
                say(f"REFRESH-DUE expires_at_ms={msg.refresh_due.expires_at_ms}")
                threading.Thread(target=refresh, daemon=True).start()
                continue
            if kind == "refresh_result":
                r = msg.refresh_result
                line = f"REFRESH-RESULT seq={r.seq} code={r.code} expires_at_ms={r.expires_at_ms}"
                say(f"{line} message={r.message}" if r.code != 0 else line)
                continue
            if kind != "event":
                continue
            e = msg.event
            name = T.Name(e.event_type).removeprefix("EVENT_TYPE_")
            say(f"EVENT {name} peer={e.peer_user_id} code={e.error_code} param={e.param}")
            if e.event_type == T.EVENT_TYPE_REQUEST and args.mode == "answer":
                send(T.EVENT_TYPE_REPLY, e.peer_user_id, code=args.reject)
            elif e.event_type == T.EVENT_TYPE_REPLY and e.error_code != 0:
                break  # the call did not start
            elif e.event_type == T.EVENT_TYPE_START and args.mode == "call":
                if args.hold > 0:
                    # Hung up later, while this loop goes on reading (and
                    # answering RefreshDue).
                    hangup = threading.Timer(args.hold, send, (T.EVENT_TYPE_FINISH, e.peer_user_id))
                    hangup.daemon = True
                    hangup.start()
                else:
                    send(T.EVENT_TYPE_FINISH, e.peer_user_id)
            elif e.event_type == T.EVENT_TYPE_FINISH:
                break
    except grpc.RpcError as err:
        code = err.code().name if hasattr(err, "code") else "UNKNOWN"
        details = err.details() if hasattr(err, "details") else str(err)
        say(f"STREAM-ERROR code={code} details={details}")
        return 1
    finally:
        if hangup is not None:
            hangup.cancel()
        outbox.put(None)
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
