"""A tiny fal.App for the end-to-end tests: fake models, a sleep for a load, no downloads.

Serve it on 127.0.0.1 (no fal account needed):

    .venv/bin/python tests/fal/app.py --port 18081 [--kit [--no-queue]] [--hints normal|huge|nonlatin|none]

It behaves like a real fal runner: `provide_hints()` lists the resident models, so fal's own
middleware puts them in `X-Fal-Runner-Hints` on every response; `GET /health` is fal's; the
inference endpoint is `POST /` (fal_client strips nothing: Envoy strips `/<owner>/<alias>`).
With `--kit` the app is wrapped by runner-kit/hint_runner.py (`/hints`, single-flight loads,
and fal's queue under `/queue/` unless `--no-queue`: docs/queue.md).
"""

import argparse
import collections
import os
import sys
import threading
import time

import fal
from pydantic import BaseModel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "runner-kit"))
from hint_runner import SingleFlight, serve_fal  # noqa: E402

ARGS = argparse.Namespace(
    capacity=2, load_ms=600, infer_ms=20, hints="normal", kit=False, port=0, name="fal",
    no_queue=False, max_pending_jobs=None,
)


class Input(BaseModel):
    model: str
    prompt: str = ""
    sleep_ms: int = 0  # extra inference time, to keep a request in flight


class HintApp(fal.App):
    """Keeps up to `capacity` fake models, least recently used evicted; a load sleeps."""

    max_multiplexing = 1

    def setup(self):
        self.lock = threading.Lock()
        self.models = collections.OrderedDict()  # model -> True, most recently used last
        self.loads = 0
        self.flight = SingleFlight() if ARGS.kit else None

    def provide_hints(self):
        if ARGS.hints == "none":
            raise NotImplementedError  # what fal does when an app provides no hints
        if ARGS.hints == "huge":
            return [f"h{i}" for i in range(10_000)]
        hints = list(reversed(self.models))
        if ARGS.hints == "nonlatin":
            # fal drops hints that are not latin-1; "caf\xe9" is latin-1 but not ASCII.
            hints = hints + ["caf\u00e9", "\u6a21\u578b"]
        return hints

    def load(self, model):
        """A model load: a sleep, no download."""
        time.sleep(ARGS.load_ms / 1000)
        with self.lock:
            self.loads += 1

    @fal.endpoint("/")
    def run(self, inp: Input) -> dict:
        with self.lock:
            cached = inp.model in self.models
        if not cached:
            if self.flight is not None:
                # The kit: concurrent misses for one model share one load.
                self.flight.get(inp.model, lambda: self.load(inp.model))
            else:
                # A plain fal app: every concurrent miss loads the model again.
                self.load(inp.model)
            with self.lock:
                self.models[inp.model] = True
                while len(self.models) > ARGS.capacity:
                    self.models.popitem(last=False)
        with self.lock:
            self.models.move_to_end(inp.model)
        time.sleep((ARGS.infer_ms + inp.sleep_ms) / 1000)
        headers = self.current_request.headers if self.current_request else {}
        return {
            "runner": ARGS.name,
            "model": inp.model,
            "cache": "hit" if cached else "miss",
            "saw_authorization": "authorization" in headers,
            "saw_hint": headers.get("x-fal-runner-hint", ""),
            "saw_request_id": headers.get("x-fal-request-id", ""),
            "loads": self.loads,
        }

    @fal.endpoint("/other")
    def other(self, inp: Input) -> dict:
        """A second endpoint: `/<owner>/<alias>/other` through Envoy reaches it."""
        return {"runner": ARGS.name, "endpoint": "other"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--capacity", type=int, default=2)
    p.add_argument("--load-ms", type=int, default=600)
    p.add_argument("--infer-ms", type=int, default=20)
    p.add_argument("--hints", choices=["normal", "huge", "nonlatin", "none"], default="normal")
    p.add_argument("--kit", action="store_true")
    p.add_argument("--no-queue", action="store_true", help="with --kit: no /queue/ paths")
    p.add_argument("--max-pending-jobs", type=int, default=None, help="with --kit")
    p.add_argument("--name", default="fal")
    p.parse_args(namespace=ARGS)

    if ARGS.kit:
        serve_fal(
            HintApp,
            host="127.0.0.1",
            port=ARGS.port,
            capacity=ARGS.capacity,
            queue=not ARGS.no_queue,
            max_pending_jobs=ARGS.max_pending_jobs,
        )
    else:
        import uvicorn

        app = HintApp(_allow_init=True)._build_app()
        uvicorn.run(app, host="127.0.0.1", port=ARGS.port, log_level="warning")


if __name__ == "__main__":
    main()
