"""A real OTLP/HTTP trace receiver for tests and benchmarks: decodes what the OpenTelemetry SDK exports."""

from __future__ import annotations

import http.server
import threading
import time
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class Receiver:
    """An OTLP/HTTP trace receiver: every span it got, as plain dicts."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.raw.append(body)
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            receiver.spans.append(_span(span, service))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace(self, request_id: str, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        """The spans of the trace whose request span has this Kong request id, once ``count`` have arrived."""
        deadline = time.monotonic() + timeout
        while True:
            roots = [s for s in self.spans if s["attributes"].get("kong.request_id") == request_id]
            spans = [s for s in self.spans if roots and s["trace_id"] == roots[0]["trace_id"]]
            if len(spans) >= count or time.monotonic() > deadline:
                return spans
            time.sleep(0.05)


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind)


def _span(span: Any, service: str) -> dict[str, Any]:
    return {"name": span.name, "kind": span.kind, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
            "parent": span.parent_span_id.hex(), "service": service, "status": span.status.code,
            "attributes": {a.key: _value(a.value) for a in span.attributes},
            "events": [(e.name, {a.key: _value(a.value) for a in e.attributes}) for e in span.events]}
