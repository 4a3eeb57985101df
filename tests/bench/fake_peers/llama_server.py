"""A stand-in for llama-server's HTTP API: /health, /lora-adapters, /completion. Answers
carry the applied adapter's id + 1 (0 for none) as every generated token; every request
body is appended to REQUESTS_LOG (beside the `-m` model) as one JSON line."""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
model = Path(args[args.index("-m") + 1])
loras = args[args.index("--lora") + 1].split(",") if "--lora" in args else []
scales = [0.0 if "--lora-init-without-apply" in args else 1.0] * len(loras)
log = model.with_name("requests.jsonl")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _answer(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self._answer({"status": "ok"})
        elif self.path == "/props":
            self._answer({"build_info": "fake"})
        elif self.path == "/lora-adapters":
            self._answer([{"id": i, "path": p, "scale": s} for i, (p, s) in enumerate(zip(loras, scales))])

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(log, "a") as handle:
            handle.write(json.dumps({"path": self.path, "body": body}) + "\n")
        if self.path == "/lora-adapters":
            for entry in body:
                scales[entry["id"]] = entry["scale"]
            self._answer({"success": True})
        elif self.path == "/completion":
            applied = [e["id"] for e in body.get("lora", []) if e["scale"]] or \
                      [i for i, s in enumerate(scales) if s]
            token = applied[0] + 1 if applied else 0
            n = body["n_predict"]
            self._answer({"content": "x", "tokens": [token] * n, "tokens_predicted": n,
                          "tokens_evaluated": len(body["prompt"].split())})


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
