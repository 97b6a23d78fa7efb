#!/usr/bin/env python3
"""A small Canopy service in Python: a counter.

    counter.get   (role user)      the current value
    counter.echo  (role user)      the payload back, with the caller's principal
    counter.add   (role operator)  add N (the payload, default 1); the new value

Serve it on the broker of CANOPY_URI until Ctrl-C::

    canopy start --size 2              # prints export CANOPY_URI=...; keep it running
    python3 examples/python-service/service.py
    canopy rpc counter.add 5           # from another shell with the same CANOPY_URI
    canopy rpc counter.get

Or the self-contained demo, which serves on the instance's last rank and
calls it from rank 0 (exit status 0 if every answer was right)::

    canopy start --size 2 -- python3 examples/python-service/service.py --demo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

# In a checkout, use its own client (python/), installed or not: the example
# and the client change together.
_CHECKOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")
if os.path.isfile(os.path.join(_CHECKOUT, "canopy", "__init__.py")):
    sys.path.insert(0, os.path.normpath(_CHECKOUT))

import canopy  # noqa: E402
import canopy.aio  # noqa: E402

NAMESPACE = "counter"
METHODS = {"get": "user", "echo": "user", "add": "operator"}


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def get(self, req: canopy.Request) -> str:
        return str(self.value)

    def echo(self, req: canopy.Request) -> dict[str, str]:
        return {"payload": req.text(), "from": req.principal}

    def add(self, req: canopy.Request) -> str:
        text = req.text().strip() or "1"
        try:
            n = int(text)
        except ValueError:
            raise canopy.ServiceError(canopy.EINVAL, f"counter.add takes an integer, not {text!r}; send e.g. 5") from None
        self.value += n
        return str(self.value)

    def handlers(self) -> dict[str, object]:
        return {"get": self.get, "echo": self.echo, "add": self.add}


def serve(uri: str | None) -> None:
    with canopy.connect(uri) as client:
        svc = client.add_service(NAMESPACE, METHODS, Counter().handlers())  # type: ignore[arg-type]
        print(f"serving {NAMESPACE}.{{{','.join(METHODS)}}} on rank {svc.rank}; Ctrl-C to stop", flush=True)
        client.serve()  # until Ctrl-C, which removes the namespace
    print(f"stopped serving {NAMESPACE}", flush=True)


async def demo(uri: str | None) -> int:
    async with canopy.aio.connect(uri) as caller:
        size = json.loads(await caller.rpc("overlay.status", b'{"summary":true}', rank=0))["size"]
        last = size - 1
        base = caller.uri.rsplit("-", 1)[0]  # local://RUNDIR/local-RANK
        async with canopy.aio.connect(f"{base}-{last}") as provider:
            svc = await provider.add_service(NAMESPACE, METHODS, Counter().handlers())  # type: ignore[arg-type]
            print(f"serving {NAMESPACE} on rank {svc.rank}")
            ok = True

            async def call(method: str, payload: str = "") -> str:
                try:
                    out = (await caller.rpc(f"{NAMESPACE}.{method}", payload, rank=last, timeout=10)).decode()
                except canopy.CanopyError as e:
                    out = f"error {e.errname}: {e.message}"
                print(f"rank 0 -> {NAMESPACE}.{method}({payload!r}) on rank {last}: {out}")
                return out

            ok &= json.loads(await call("echo", "hello"))["payload"] == "hello"
            sums = await asyncio.gather(*(call("add", "2") for _ in range(5)))  # handled concurrently
            ok &= sorted(int(s) for s in sums) == [2, 4, 6, 8, 10]
            ok &= await call("get") == "10"
            ok &= (await call("add", "lots")).startswith("error EINVAL: counter.add takes an integer")
            await svc.remove()
            ok &= (await call("get")).startswith("error ENOSYS")
    print("demo ok" if ok else "demo FAILED")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", help="the broker to serve on (default: CANOPY_URI)")
    ap.add_argument("--demo", action="store_true", help="serve on the last rank, call it from rank 0, exit")
    args = ap.parse_args()
    if args.demo:
        return asyncio.run(asyncio.wait_for(demo(args.uri), 60))
    serve(args.uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
