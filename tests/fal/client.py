"""Drives the real fal_client for the end-to-end tests (tests/tests/fal.rs).

    FAL_RUN_HOST=127.0.0.1:PORT SSL_CERT_FILE=cert.pem FAL_KEY=any \
        .venv/bin/python tests/fal/client.py APP CALLS_JSON

CALLS_JSON is a list of `{"call": "run" | "run_async", "model": M, "hint": H | null,
"path": ""}`; the calls run one after another and one JSON line is printed per call:
`{"ok": true, "result": {...}, "ms": 12.3}` or `{"ok": false, "error": "..."}`.
"""

import asyncio
import json
import sys
import time

import fal_client


async def one(app, c):
    args = {"model": c["model"], "prompt": "hello"}
    t = time.monotonic()
    try:
        if c["call"] == "run_async":
            result = await fal_client.run_async(app, args, hint=c.get("hint"), path=c.get("path", ""))
        else:
            # Blocking inside the loop is fine here: the calls run one after another.
            result = fal_client.run(app, args, hint=c.get("hint"), path=c.get("path", ""))
        out = {"ok": True, "result": result}
    except Exception as e:  # reported to the test, which asserts on it
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    out["ms"] = (time.monotonic() - t) * 1000
    return out


async def main():
    app, calls = sys.argv[1], json.loads(sys.argv[2])
    # One event loop for every call: fal_client's async client is bound to the first loop.
    for c in calls:
        print(json.dumps(await one(app, c)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
