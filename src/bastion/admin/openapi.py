"""The OpenAPI 3.1 document of the admin API (`GET /openapi.json`), written out by hand.

It is data, kept next to the handlers' table in `api.py`; a test checks that its paths are
exactly the table's and that the document validates.
"""

from __future__ import annotations

from typing import Any

from bastion import __version__


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(description, _ref("Error"))


_UNAUTHORIZED = {"401": {"$ref": "#/components/responses/Unauthorized"}}


def _get(summary: str, description: str, ok: dict[str, Any], **more: dict[str, Any]) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "description": description,
            "operationId": summary.lower().replace(" ", "_").replace(",", "").replace("'", ""),
            "responses": {"200": ok, **more, **_UNAUTHORIZED},
        }
    }


_TARGET_PARAMS = [
    {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "The upstream's name.",
        "schema": {"type": "string"},
    },
    {
        "name": "address",
        "in": "path",
        "required": True,
        "description": "The target's address as written in the config (`10.0.0.5:8080`, `[::1]:8080`; "
        "brackets may be percent-encoded).",
        "schema": {"type": "string"},
    },
]


def _target_action(verb: str, description: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": f"{verb.capitalize()} a target",
            "description": description,
            "operationId": f"{verb}_target",
            "parameters": _TARGET_PARAMS,
            "responses": {
                "200": _json(f"The target is {verb}d in every worker that answered.", _ref("TargetAction")),
                "404": _error("No such upstream, or no such target in it."),
                **_UNAUTHORIZED,
            },
        }
    }


def document() -> dict[str, Any]:
    """The whole document (a fresh dict each call)."""
    any_object = {"type": "object", "additionalProperties": True}
    paths: dict[str, Any] = {
        "/": {
            "get": {
                "summary": "Dashboard",
                "description": "The dashboard, an HTML page that reads only this API. It is served without the "
                "token (a browser cannot send one when it opens a page) and holds no data: the page asks for "
                "the token and sends it with each API call (docs/admin.md).",
                "operationId": "dashboard",
                "security": [],
                "responses": {
                    "200": {"description": "The page.", "content": {"text/html": {"schema": {"type": "string"}}}},
                },
            }
        },
        "/dashboard/{file}": {
            "get": {
                "summary": "Dashboard file",
                "description": "A static file of the dashboard (script, stylesheet), served without the token "
                "like the page.",
                "operationId": "dashboard_file",
                "security": [],
                "parameters": [{"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "The file.", "content": {"*/*": {"schema": {"type": "string"}}}},
                    "404": _error("No such file."),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "description": "Every metric of the whole gateway (all workers added up), in the Prometheus text "
                "format 0.0.4. Names and labels: docs/admin.md.",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "The exposition.",
                        "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}},
                    },
                    **_UNAUTHORIZED,
                },
            }
        },
        "/healthz": _get(
            "Liveness", "Answers 200 while the process serves the admin API.", _json("Alive.", any_object)
        ),
        "/readyz": _get(
            "Readiness",
            "200 when the config is loaded and the listeners are bound in every worker; 503 otherwise "
            "(starting, a worker missing, or draining for shutdown).",
            _json("Ready.", _ref("Readiness")),
            **{"503": _json("Not ready.", _ref("Readiness"))},
        ),
        "/status": _get(
            "Status",
            "Version, the config running (version, source, digest), uptime, workers and reloads.",
            _json("The gateway's status.", _ref("Status")),
        ),
        "/routes": _get(
            "Routes",
            "The compiled route table, in match order.",
            _json(
                "The routes.", {"type": "object", "properties": {"routes": {"type": "array", "items": _ref("Route")}}}
            ),
        ),
        "/upstreams": _get(
            "Upstreams",
            "Every upstream and each of its targets with health, ejections, drain, in-flight requests, "
            "EWMA latency and pool connections, for the whole gateway.",
            _json(
                "The upstreams.",
                {"type": "object", "properties": {"upstreams": {"type": "array", "items": _ref("Upstream")}}},
            ),
        ),
        "/stats": {
            "get": {
                "summary": "Recent traffic",
                "description": "Per route and in total over the last `window` (10s to 5m, default 1m): requests, "
                "requests per second, status classes, latency p50/p90/p99 in milliseconds (estimated from the "
                "histogram buckets of /metrics, as histogram_quantile does) and a series of 10-second "
                "intervals. Taken from samples of the counters every 10 seconds, so a window of W covers "
                "between W and W + 10 s (exactly `from` to `to`), or less when the gateway is younger.",
                "operationId": "stats",
                "parameters": [
                    {
                        "name": "window",
                        "in": "query",
                        "required": False,
                        "description": "A duration with a unit: 30s, 1m, 5m.",
                        "schema": {"type": "string", "default": "1m"},
                    }
                ],
                "responses": {
                    "200": _json("The recent traffic.", _ref("Stats")),
                    "400": _error("window is not a duration from 10s to 5m."),
                    **_UNAUTHORIZED,
                },
            }
        },
        "/errors": _get(
            "Recent errors",
            "The newest server-side errors, newest first: 5xx answers (made by the gateway, a plugin or the "
            "upstream) and responses an upstream failure cut short. Each process keeps its last 100; 4xx "
            "answers are counted in /metrics and /stats but not kept here.",
            _json("The recent errors.", _ref("RecentErrors")),
        ),
        "/upstreams/{name}/targets/{address}/drain": _target_action(
            "drain",
            "Stop sending new requests to the target (requests in flight finish). Lasts across config "
            "reloads and worker restarts, until enabled again.",
        ),
        "/upstreams/{name}/targets/{address}/enable": _target_action(
            "enable", "Undo a drain: the target takes new requests again (when healthy)."
        ),
        "/reload": {
            "post": {
                "summary": "Reload the config",
                "description": "The same as SIGHUP: read the config again, build it, swap it in. A config that "
                "fails to load or build is refused and the running one stays.",
                "operationId": "reload",
                "responses": {
                    "200": _json("Applied in every worker.", _ref("ReloadResult")),
                    "422": _json("Refused: the problems, with file:line and key path.", _ref("ReloadRefused")),
                    "503": _error("The gateway is shutting down, or a worker did not answer."),
                    **_UNAUTHORIZED,
                },
            }
        },
        "/config": _get(
            "Config",
            "The running config with every default filled in and secrets masked as <redacted>.",
            _json("The config.", any_object),
        ),
        "/openapi.json": _get("OpenAPI", "This document.", _json("An OpenAPI 3.1 document.", any_object)),
    }
    integer = {"type": "integer"}
    number = {"type": "number"}
    string = {"type": "string"}
    boolean = {"type": "boolean"}
    nullable_string = {"type": ["string", "null"]}
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error", "message", "request_id"],
            "properties": {"error": string, "message": string, "request_id": string},
        },
        "Readiness": {
            "type": "object",
            "properties": {"ready": boolean, "workers_expected": integer, "workers_ready": integer},
        },
        "Worker": {
            "type": "object",
            "properties": {
                "index": integer,
                "answered": boolean,
                "pid": integer,
                "ready": boolean,
                "started_at": number,
                "uptime_seconds": number,
                "restarts": integer,
                "connections": integer,
                "requests": integer,
                "rss_bytes": integer,
            },
        },
        "ConfigInfo": {
            "type": "object",
            "properties": {
                "source": string,
                "version": {"type": ["integer", "null"]},
                "sha256": string,
                "applied_at": number,
            },
        },
        "Status": {
            "type": "object",
            "properties": {
                "version": string,
                "ready": boolean,
                "config": {"oneOf": [_ref("ConfigInfo"), {"type": "null"}]},
                "uptime_seconds": number,
                "started_at": number,
                "workers_expected": integer,
                "workers": {"type": "array", "items": _ref("Worker")},
                "reloads": {"type": "object", "properties": {"applied": integer, "rejected": integer}},
                "last_reload": {"type": ["object", "null"]},
            },
        },
        "Route": {
            "type": "object",
            "properties": {
                "order": integer,
                "name": string,
                "hosts": {"type": "array", "items": string},
                "path": nullable_string,
                "path_kind": string,
                "methods": {"type": "array", "items": string},
                "headers": {"type": "object", "additionalProperties": string},
                "upstream": string,
                "strip_prefix": nullable_string,
                "plugins": {"type": "array", "items": string},
            },
        },
        "Target": {
            "type": "object",
            "properties": {
                "address": string,
                "weight": integer,
                "backup": boolean,
                "up": boolean,
                "healthy": boolean,
                "health_reason": string,
                "ejected": boolean,
                "ejections": integer,
                "drained": boolean,
                "in_flight": integer,
                "requests": integer,
                "failures": integer,
                "latency_ewma_ms": number,
                "pool": {"type": "object", "additionalProperties": integer},
                "workers": integer,
                "workers_up": integer,
            },
        },
        "Upstream": {
            "type": "object",
            "properties": {
                "name": string,
                "balance": string,
                "queue_waiting": integer,
                "targets": {"type": "array", "items": _ref("Target")},
            },
        },
        "TrafficSummary": {
            "type": "object",
            "properties": {
                "requests": integer,
                "requests_per_second": number,
                "status": {
                    "type": "object",
                    "description": "Requests by status class; `other`: ended with no status.",
                    "properties": {name: integer for name in ("other", "1xx", "2xx", "3xx", "4xx", "5xx")},
                },
                "latency_ms": {
                    "type": "object",
                    "description": "Percentiles in milliseconds; null without requests.",
                    "properties": {name: {"type": ["number", "null"]} for name in ("p50", "p90", "p99")},
                },
            },
        },
        "RouteTraffic": {
            "allOf": [
                _ref("TrafficSummary"),
                {
                    "type": "object",
                    "properties": {
                        "route": {"type": "string", "description": "The route's name; `(none)` for unrouted."},
                        "series": {
                            "type": "array",
                            "description": "Complete sample intervals in the window, oldest first.",
                            "items": {
                                "type": "object",
                                "properties": {"at": number, "seconds": number, "requests": integer, "errors": integer},
                            },
                        },
                    },
                },
            ]
        },
        "Stats": {
            "type": "object",
            "properties": {
                "window_seconds": number,
                "interval_seconds": number,
                "from": {"type": ["number", "null"]},
                "to": {"type": ["number", "null"]},
                "covered_seconds": number,
                "total": _ref("TrafficSummary"),
                "routes": {"type": "array", "items": _ref("RouteTraffic")},
            },
        },
        "RecentError": {
            "type": "object",
            "properties": {
                "at": number,
                "status": integer,
                "error": nullable_string,
                "message": nullable_string,
                "source": {"type": "string", "enum": ["gateway", "upstream", "plugin"]},
                "route": string,
                "method": string,
                "host": string,
                "path": string,
                "upstream": nullable_string,
                "target": nullable_string,
                "request_id": string,
                "duration_ms": number,
            },
        },
        "RecentErrors": {
            "type": "object",
            "properties": {
                "errors": {"type": "array", "items": _ref("RecentError")},
                "kept": integer,
                "seen": integer,
            },
        },
        "TargetAction": {
            "type": "object",
            "properties": {
                "upstream": string,
                "target": string,
                "drained": boolean,
                "workers": integer,
                "workers_applied": integer,
            },
        },
        "ReloadResult": {
            "type": "object",
            "properties": {"result": string, "config": _ref("ConfigInfo"), "workers": integer},
        },
        "ReloadRefused": {
            "allOf": [
                _ref("Error"),
                {"type": "object", "properties": {"problems": {"type": "array", "items": string}}},
            ]
        },
    }
    for operations in paths.values():
        for operation in operations.values():
            operation["responses"]["403"] = {"$ref": "#/components/responses/Forbidden"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Bastion admin API",
            "version": __version__,
            "description": "Status, metrics and control of a running Bastion gateway. With --workers N every "
            "endpoint answers for the whole gateway. When admin.token is set, every endpoint but the "
            "dashboard's files needs `Authorization: Bearer TOKEN`. Requests whose Host is not the listener's "
            "own name, and POSTs from another site's page (Origin), are refused with 403.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "Unauthorized": {
                    "description": "A token is configured and the request did not carry it.",
                    "headers": {"WWW-Authenticate": {"schema": string}},
                    "content": {"application/json": {"schema": _ref("Error")}},
                },
                "Forbidden": {
                    "description": "Sent by a browser for another site: `host_forbidden` (Host is not this "
                    "listener's name: DNS rebinding) or `origin_forbidden` (a POST whose Origin is another site).",
                    "content": {"application/json": {"schema": _ref("Error")}},
                },
            },
        },
        "security": [{"bearer": []}, {}],
    }
