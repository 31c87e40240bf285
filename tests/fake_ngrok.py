"""A stand-in for the ngrok agent, enough for pyngrok's real code path: `--version`,
`start --none --log stdout [--authtoken T] [--config F]` printing the agent's JSON log lines, and the
local API (`GET/POST /api/tunnels`, `DELETE /api/tunnels/<name>`). It reaches nothing outside."""

import json
import sys
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TUNNELS = {}


def log(level, msg, **fields):
    """The agent's `--log stdout` format: logfmt."""
    parts = ["t=2026-11-24T00:00:00+0000", f"lvl={level}", f"msg={json.dumps(msg)}"]
    parts += [f"{k}={json.dumps(v) if ' ' in str(v) else v}" for k, v in fields.items()]
    print(" ".join(parts), flush=True)


class Api(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body=None):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/") == "/api/tunnels":
            return self.reply(200, {"tunnels": list(TUNNELS.values()), "uri": "/api/tunnels"})
        self.reply(404, {"error_code": 100, "msg": "not found"})

    def do_POST(self):
        options = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        name = options.get("name") or f"tunnel-{uuid.uuid4().hex[:6]}"
        tunnel = {"name": name, "uri": f"/api/tunnels/{name}", "proto": "https",
                  "public_url": f"https://{name}.fake-ngrok.test",
                  "config": {"addr": f"http://localhost:{options.get('addr')}", "inspect": False}, "metrics": {}}
        TUNNELS[name] = tunnel
        self.reply(201, tunnel)

    def do_DELETE(self):
        TUNNELS.pop(self.path.rsplit("/", 1)[-1], None)
        self.reply(204)


def main(argv):
    if "--version" in argv:
        print("ngrok version 3.19.0")
        return 0
    if argv[:1] == ["config"]:
        return 0
    if "--authtoken" not in argv:
        log("eror", "session closing", obj="tunnels.session",
            err="authentication failed: Usage of ngrok requires a verified account and authtoken.")
        return 1
    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    log("info", "starting web service", obj="web", addr=f"127.0.0.1:{server.server_address[1]}")
    log("info", "client session established", obj="tunnels.session")
    log("info", "tunnel session started", obj="tunnels.session")
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
