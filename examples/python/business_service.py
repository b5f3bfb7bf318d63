"""An example business service for the video-call system, in Python.

It implements `videocall.v1.BusinessHook` from the .proto files alone:

  * approves every call request except those from blocked callers, which it
    refuses with its own result code (the caller receives it unchanged);
  * prints every call event it is told about.

    python generate.py gen
    python business_service.py --stubs gen --listen 127.0.0.1:50061 --block mallory --code 777003

Then start the call service with --business-url http://127.0.0.1:50061.
"""

import argparse
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stubs", type=Path, required=True, help="directory the stubs were generated into")
    parser.add_argument("--listen", default="127.0.0.1:50061")
    parser.add_argument("--block", action="append", default=[], help="a caller to refuse (repeatable)")
    parser.add_argument("--code", type=int, default=777003, help="the refusal code")
    args = parser.parse_args()

    sys.path.insert(0, str(args.stubs))
    import grpc
    from videocall.v1 import business_pb2, business_pb2_grpc, types_pb2

    class Hook(business_pb2_grpc.BusinessHookServicer):
        def OnCallEvent(self, notice, context):
            event = types_pb2.EventType.Name(notice.event_type).removeprefix("EVENT_TYPE_")
            decision = ""
            result = 0
            # Only a REQUEST with decision_required waits for our answer.
            if notice.decision_required:
                result = args.code if notice.caller_user_id in args.block else 0
                decision = f" decision={result}"
            print(
                f"{event} call={notice.call_id} seq={notice.sequence} "
                f"{notice.source_user_id}->{notice.target_user_id} code={notice.error_code}{decision}",
                flush=True,
            )
            return business_pb2.CallEventAck(result_code=result)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    business_pb2_grpc.add_BusinessHookServicer_to_server(Hook(), server)
    port = server.add_insecure_port(args.listen)
    host = args.listen.rsplit(":", 1)[0]
    server.start()
    print(f"python-business listening: hook={host}:{port}", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()


if __name__ == "__main__":
    main()
