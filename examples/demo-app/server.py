"""A tiny HTTP server that says which version of the demo app is running."""

import http.server
import pathlib

VERSION = (pathlib.Path(__file__).parent / "VERSION").read_text().strip()


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the version."""

    def do_GET(self) -> None:
        body = f"demo-app {VERSION}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        """Stay quiet."""


if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
