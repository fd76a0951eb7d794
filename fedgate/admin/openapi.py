"""The OpenAPI 3.1 document of the admin API (GET /api/v1/openapi.json).

Written out by hand, separately from the route table in resources.py, so
that ``tests/test_admin_openapi.py`` can hold the two against each other
(every route documented, every documented operation served) and check real
responses against the schemas here.
"""

from __future__ import annotations

from fedgate.policy import AUTHENTICATIONS, ENCRYPTIONS, MODES

P = "/api/v1"
NULLABLE_INT = {"type": ["integer", "null"]}
NULLABLE_NUM = {"type": ["number", "null"]}
NULLABLE_STR = {"type": ["string", "null"]}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], properties: dict, extra: bool = False) -> dict:
    return {"type": "object", "required": required, "properties": properties,
            "additionalProperties": extra}


SCHEMAS = {
    "Error": _obj(["status", "error", "message"], {
        "status": {"type": "integer"}, "error": {"type": "string"}, "message": {"type": "string"},
        "field": {"type": "string"}}),
    "Peer": _obj(["domain", "allowed", "encryption", "authentication", "addresses",
                  "max_stanza_bytes", "rate_limit", "note", "source"], {
        "domain": {"type": "string"},
        "allowed": {"type": "boolean"},
        "encryption": {"enum": list(ENCRYPTIONS)},
        "authentication": {"enum": list(AUTHENTICATIONS)},
        "addresses": {"type": "array", "items": {"type": "string"}},
        "max_stanza_bytes": NULLABLE_INT,
        "rate_limit": NULLABLE_NUM,
        "note": {"type": "string"},
        "source": {"enum": ["api", "config"]},
        "live": _obj(["blocked", "connections", "queued_stanzas"], {
            "blocked": {"type": "boolean"},
            "connections": {"type": "array", "items": {"type": "integer"}},
            "queued_stanzas": {"type": "integer"}}),
    }),
    "PeerInput": _obj([], {
        "domain": {"type": "string"}, "allowed": {"type": "boolean"},
        "encryption": {"enum": list(ENCRYPTIONS)}, "authentication": {"enum": list(AUTHENTICATIONS)},
        "addresses": {"type": "array", "maxItems": 16, "items": {"type": "string"}},
        "max_stanza_bytes": NULLABLE_INT, "rate_limit": NULLABLE_NUM, "note": {"type": "string"},
        "source": {"type": "string", "readOnly": True}}),
    "PeerList": _obj(["mode", "peers"], {"mode": {"enum": list(MODES)},
                                         "peers": {"type": "array", "items": _ref("Peer")}}),
    "DefaultPolicy": _obj([], {"encryption": {"enum": list(ENCRYPTIONS)},
                               "authentication": {"enum": list(AUTHENTICATIONS)},
                               "max_stanza_bytes": NULLABLE_INT, "rate_limit": NULLABLE_NUM}),
    "Policy": _obj(["mode", "default", "source"], {
        "mode": {"enum": list(MODES)}, "default": _ref("DefaultPolicy"),
        "source": {"enum": ["api", "config"]}}),
    "PolicyInput": _obj([], {"mode": {"enum": list(MODES)}, "default": _ref("DefaultPolicy"),
                             "source": {"type": "string", "readOnly": True}}),
    "Pair": _obj(["local", "remote", "state", "method", "since", "stanzas_in", "stanzas_out"], {
        "local": {"type": "string"}, "remote": {"type": "string"},
        "state": {"enum": ["pending", "valid", "invalid"]}, "method": NULLABLE_STR,
        "since": {"type": "number"}, "stanzas_in": {"type": "integer"},
        "stanzas_out": {"type": "integer"}}, extra=True),
    "Connection": _obj(["id", "direction", "remote_address", "opened_at", "remote_domain", "tls",
                        "bidi", "state", "age_seconds", "auth_methods", "counters", "pair_count",
                        "stream_management"], {
        "id": {"type": "integer"}, "direction": {"enum": ["inbound", "outbound"]},
        "remote_address": {"type": "string"}, "opened_at": {"type": "number"},
        "remote_domain": NULLABLE_STR,
        "tls": {"type": ["object", "null"], "description": "version, cipher, peer_subject, "
                "chain_ok, chain_errors once encrypted"},
        "bidi": {"type": "boolean"},
        "state": {"enum": ["authenticating", "authenticated"]},
        "age_seconds": {"type": "number"},
        "auth_methods": {"type": "array", "items": {"type": "string"}},
        "counters": _obj(["stanzas_in", "stanzas_out"], {"stanzas_in": {"type": "integer"},
                                                         "stanzas_out": {"type": "integer"}}),
        "pair_count": {"type": "integer"},
        "stream_management": _obj(["enabled", "unacked", "resumable", "h_in", "h_out"], {
            "enabled": {"type": "boolean", "description": "XEP-0198 enabled on this stream"},
            "unacked": {"type": "integer", "description": "stanzas we sent that the peer has not "
                        "acknowledged yet"},
            "resumable": {"type": "boolean", "description": "the session may be resumed within "
                          "s2s.sm_resume_timeout after the connection drops"},
            "h_in": {"type": "integer", "description": "stanzas handled from the peer (mod 2^32)"},
            "h_out": {"type": "integer", "description": "stanzas sent to the peer (mod 2^32)"}}),
        "pairs": {"type": "array", "items": _ref("Pair")}}, extra=True),
    "ConnectionList": _obj(["connections"], {"connections": {"type": "array", "items": _ref("Connection")}}),
    "Closed": _obj(["id", "closed", "condition", "text"], {
        "id": {"type": "integer"}, "closed": {"type": "boolean"}, "condition": {"type": "string"},
        "text": {"type": "string"}}),
    "Destination": _obj(["domain", "state", "blocked", "queue", "failures", "last_error", "retry_at",
                         "retry_in_seconds", "connection_id", "connection_ids", "pending_pairs"], {
        "domain": {"type": "string"}, "state": {"type": "string", "description": "idle, connecting, open, backoff, "
                  "reverse (authenticating over a peer's bidi stream), or closing (an operator "
                  "closed its stream; the queue waits for a new one)"},
        "blocked": {"type": "boolean"},
        "queue": _obj(["stanzas", "bytes", "oldest_age_seconds"], {
            "stanzas": {"type": "integer"}, "bytes": {"type": "integer"},
            "oldest_age_seconds": NULLABLE_NUM}),
        "failures": {"type": "integer"}, "last_error": NULLABLE_STR, "retry_at": NULLABLE_NUM,
        "retry_in_seconds": NULLABLE_NUM, "connection_id": NULLABLE_INT,
        "connection_ids": {"type": "array", "items": {"type": "integer"}, "description":
                           "our outbound connections to the domain: the shared one first, then any "
                           "opened for a local domain that could not piggyback"},
        "pending_pairs": {"type": "array", "description": "pairs we asked for and still wait on "
                          "(each times out after s2s.pair_timeout; its stanzas then bounce)",
                          "items": _obj(["local", "connection_id", "age_seconds"], {
                              "local": {"type": "string"}, "connection_id": {"type": "integer"},
                              "age_seconds": {"type": "number"}})}}),
    "ClusterNode": _obj(["node", "health", "lease_remaining_seconds", "heartbeat_at",
                         "heartbeat_age_seconds", "components", "streams", "destinations"], {
        "node": {"type": "string"},
        "health": {"enum": ["up", "down"], "description": "up while the node's lease key lives"},
        "lease_remaining_seconds": {"type": "number"},
        "instance": {"type": "string"},
        "heartbeat_at": {"type": "number", "description": "Unix time of the last heartbeat"},
        "heartbeat_age_seconds": NULLABLE_NUM,
        "started_at": {"type": "number"},
        "components": {"type": "array", "items": {"type": "string"},
                       "description": "component domains bound on the node"},
        "streams": {"type": "array", "description": "the node's S2S connections (at most 1000)",
                    "items": _obj(["id", "direction", "remote", "bidi", "pairs"], {
                        "id": {"type": "integer"}, "direction": {"enum": ["inbound", "outbound"]},
                        "remote": NULLABLE_STR, "bidi": {"type": "boolean"},
                        "pair_count": {"type": "integer", "description": "valid pairs in all"},
                        "pairs": {"type": "array",
                                  "description": "valid (local, remote) pairs (at most 4)",
                                  "items": {"type": "array", "items": {"type": "string"}}}})},
        "streams_total": {"type": "integer"},
        "destinations": {"type": "array", "description": "the node's senders (at most 1000)",
                         "items": _obj(["domain", "state", "queued_stanzas"], {
                             "domain": {"type": "string"}, "state": {"type": "string"},
                             "queued_stanzas": {"type": "integer"}})},
        "destinations_total": {"type": "integer"},
        "in_flight": {"type": "integer"},
        "relay": _ref("ClusterRelay")}),
    "ClusterRelay": _obj(["forwarded", "received", "acked", "rerouted", "bounced"], {
        "forwarded": {"type": "integer"}, "received": {"type": "integer"},
        "acked": {"type": "integer"}, "rerouted": {"type": "integer"},
        "discarded": {"type": "integer"},
        "bounced": _obj([], {k: {"type": "integer"}
                             for k in ("timeout", "redis", "full", "lapsed")})}),
    "Cluster": _obj(["node", "redis_connected", "lease_seconds", "heartbeat_seconds", "in_flight",
                     "relay", "nodes"], {
        "node": {"type": "string", "description": "the node that answered"},
        "redis_connected": {"type": "boolean"},
        "lease_seconds": {"type": "number"}, "heartbeat_seconds": {"type": "number"},
        "in_flight": {"type": "integer"}, "relay": _ref("ClusterRelay"),
        "nodes": {"type": "array", "items": _ref("ClusterNode")}}),
    "DestinationList": _obj(["destinations"], {"destinations": {"type": "array", "items": _ref("Destination")}}),
    "Component": _obj(["domain", "source", "protocols", "secret_set", "password_set",
                       "allowed_hostnames", "certificate_sha256", "trust_anchor_set",
                       "certificate_name", "note", "connected", "bound_hostnames", "peer",
                       "stanzas_in", "stanzas_out"], {
        "domain": {"type": "string"}, "source": {"enum": ["api", "config"]},
        "protocols": {"type": "array", "items": {"enum": ["xep-0114", "xep-0225"]}},
        "secret_set": {"type": "boolean"}, "password_set": {"type": "boolean"},
        "allowed_hostnames": {"type": "array", "items": {"type": "string"}},
        "certificate_sha256": {"type": "array", "items": {"type": "string"},
                               "description": "XEP-0225 SASL EXTERNAL: pinned leaf fingerprints"},
        "trust_anchor_set": {"type": "boolean"},
        "certificate_name": {**NULLABLE_STR, "description": "the exact name a certificate "
                             "issued under the trust anchor must carry"},
        "note": {"type": "string"}, "connected": {"type": "boolean"},
        "bound_hostnames": {"type": "array", "items": {"type": "string"}},
        "peer": NULLABLE_STR, "stanzas_in": {"type": "integer"}, "stanzas_out": {"type": "integer"}}),
    "ComponentInput": _obj([], {
        "secret": {"type": ["string", "null"], "minLength": 16, "maxLength": 1024, "writeOnly": True,
                   "description": "XEP-0114 handshake secret"},
        "password": {"type": ["string", "null"], "minLength": 12, "maxLength": 1024, "writeOnly": True,
                     "description": "XEP-0225 SASL password; only salted SCRAM keys are kept"},
        "allowed_hostnames": {"type": "array", "items": {"type": "string"},
                              "description": "XEP-0225: hostnames besides its own it may bind"},
        "certificate_sha256": {"type": ["array", "null"], "items": {"type": "string"}, "maxItems": 16,
                               "description": "XEP-0225 SASL EXTERNAL: SHA-256 fingerprints of the "
                                              "DER leaf certificate (hex, colons allowed)"},
        "trust_anchor_pem": {"type": ["string", "null"], "maxLength": 65536,
                             "description": "XEP-0225 SASL EXTERNAL: PEM CA certificate(s) the "
                                            "component's certificate must chain to (instead of "
                                            "the gateway's trust roots)"},
        "certificate_name": {"type": ["string", "null"],
                             "description": "the exact name (dNSName or XmppAddr) a certificate "
                                            "under trust_anchor_pem must carry; default: the domain"},
        "note": {"type": "string"}}),
    "ComponentList": _obj(["components"], {"components": {"type": "array", "items": _ref("Component")}}),
    "Disconnected": _obj(["domain", "disconnected"], {"domain": {"type": "string"},
                                                      "disconnected": {"type": "boolean"}}),
    "Status": _obj(["version", "started_at", "uptime_seconds", "listeners", "domains", "components",
                    "federation", "counts"], {
        "version": {"type": "string"}, "started_at": {"type": "number"},
        "uptime_seconds": {"type": "number"},
        "listeners": {"type": "array", "items": _obj(["kind", "host", "port"], {
            "kind": {"type": "string"}, "host": {"type": "string"}, "port": {"type": "integer"}})},
        "domains": {"type": "array", "items": {"type": "string"}},
        "components": _obj(["configured", "connected"], {
            "configured": {"type": "array", "items": {"type": "string"}},
            "connected": {"type": "array", "items": {"type": "string"}}}),
        "federation": _obj(["mode", "source"], {"mode": {"enum": list(MODES)},
                                                "source": {"enum": ["api", "config"]}}),
        "counts": {"type": "object"}}),
    "DiagnoseInput": _obj([], {"from": {"type": "string", "description": "our domain to federate "
                                        "as (default: the first configured domain)"},
                               "method": {"enum": ["auto", "dialback", "sasl-external"],
                                          "description": "how to authenticate (auto: SASL "
                                          "EXTERNAL where possible, else dialback)"}}),
    "DiagnosisStep": _obj(["step", "status", "ms"], {
        "step": {"enum": ["policy", "dns", "tcp", "stream", "tls", "authentication"]},
        "status": {"enum": ["ok", "failed", "warning", "skipped", "not_attempted"]},
        "ms": {"type": "number"}}, extra=True),
    "Diagnosis": _obj(["domain", "from", "ok", "ms", "steps"], {
        "domain": {"type": "string"}, "from": {"type": "string"}, "ok": {"type": "boolean"},
        "ms": {"type": "number"}, "steps": {"type": "array", "items": _ref("DiagnosisStep")}}),
}

_ERRORS = {400: "Malformed JSON, body or path", 401: "Missing or wrong bearer token",
           404: "No such item (or route)", 409: "Conflicts with the current state",
           413: "Body over 1 MiB", 415: "Body is not application/json",
           422: "Invalid field value or domain", 503: "Storage unavailable"}


def _op(op_id: str, summary: str, ok: dict[int, str | None], errors=(), body: str | None = None,
        body_required: bool = True, params=(), tags=()) -> dict:
    responses = {}
    for status, schema in ok.items():
        if schema is None:
            responses[str(status)] = {"description": "No content"}
        else:
            responses[str(status)] = {"description": "Success", "content": {
                "application/json": {"schema": _ref(schema)}}}
    for status in sorted({401, *errors}):
        responses[str(status)] = {"description": _ERRORS[status], "content": {
            "application/json": {"schema": _ref("Error")}}}
    op = {"operationId": op_id, "summary": summary, "tags": list(tags), "responses": responses}
    if params:
        op["parameters"] = list(params)
    if body:
        op["requestBody"] = {"required": body_required, "content": {
            "application/json": {"schema": _ref(body)}}}
    return op


def _path_param(name: str, kind: str = "string", doc: str = "") -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": kind},
            "description": doc}


def _query(name: str, schema: dict, doc: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": doc}


DOMAIN = _path_param("domain", doc="A domain; normalised by RFC 7622 (IDNA2008) rules")
CONN_ID = _path_param("id", "integer", "A connection id from GET /connections")
WRITE = (400, 413, 415, 422, 503)

PATHS = {
    f"{P}/status": {"get": _op("getStatus", "Version, uptime, listeners, domains and counts",
                               {200: "Status"}, tags=["status"])},
    f"{P}/policy": {
        "get": _op("getPolicy", "The federation mode and the default peer policy", {200: "Policy"},
                   tags=["policy"]),
        "put": _op("putPolicy", "Replace the mode and default policy (stored)", {200: "Policy"},
                   WRITE, "PolicyInput", tags=["policy"]),
        "patch": _op("patchPolicy", "Change the mode or default policy fields (stored)",
                     {200: "Policy"}, WRITE, "PolicyInput", tags=["policy"]),
        "delete": _op("resetPolicy", "Forget the stored mode and default; the file's apply",
                      {200: "Policy"}, (503,), tags=["policy"]),
    },
    f"{P}/peers": {"get": _op("listPeers", "Every per-peer policy", {200: "PeerList"}, tags=["peers"])},
    f"{P}/peers/{{domain}}": {
        "parameters": [DOMAIN],
        "get": _op("getPeer", "One peer's policy and live state", {200: "Peer"}, (404, 422),
                   tags=["peers"]),
        "put": _op("putPeer", "Create or replace a peer's policy; applies to live connections",
                   {200: "Peer", 201: "Peer"}, WRITE, "PeerInput", tags=["peers"]),
        "patch": _op("patchPeer", "Change some fields of a peer's policy; a peer not known yet "
                     "is created from the default policy with them (201)", {200: "Peer", 201: "Peer"},
                     WRITE, "PeerInput", tags=["peers"]),
        "delete": _op("deletePeer", "Delete the stored policy (the file's entry, if any, applies)",
                      {200: "Peer", 204: None}, (404, 409, 422, 503), tags=["peers"]),
    },
    f"{P}/connections": {"get": _op(
        "listConnections", "Live S2S connections", {200: "ConnectionList"}, (422,),
        params=[_query("remote", {"type": "string"}, "only connections carrying this remote domain"),
                _query("direction", {"enum": ["inbound", "outbound"]}, "only this direction"),
                _query("state", {"enum": ["authenticating", "authenticated"]}, "only this state")],
        tags=["connections"])},
    f"{P}/connections/{{id}}": {
        "parameters": [CONN_ID],
        "get": _op("getConnection", "One connection with its domain pairs, TLS facts and counters",
                   {200: "Connection"}, (404,), tags=["connections"]),
        "delete": _op("closeConnection", "Close with a policy-violation stream error; queued "
                      "stanzas wait for a new connection", {202: "Closed"}, (404,),
                      tags=["connections"]),
    },
    f"{P}/destinations": {"get": _op("listDestinations", "Per-remote-domain senders",
                                     {200: "DestinationList"}, tags=["destinations"])},
    f"{P}/destinations/{{domain}}": {
        "parameters": [DOMAIN],
        "get": _op("getDestination", "Queue depth, state, backoff and last error",
                   {200: "Destination"}, (404, 422), tags=["destinations"])},
    f"{P}/destinations/{{domain}}/reset": {
        "parameters": [DOMAIN],
        "post": _op("resetDestination", "Clear the backoff and retry now", {200: "Destination"},
                    (404, 422), tags=["destinations"])},
    f"{P}/components": {"get": _op("listComponents", "Component domains and their sessions",
                                   {200: "ComponentList"}, tags=["components"])},
    f"{P}/components/{{domain}}": {
        "parameters": [DOMAIN],
        "get": _op("getComponent", "One component (never its secret)", {200: "Component"},
                   (404, 422), tags=["components"]),
        "put": _op("putComponent", "Accept a component domain with these credentials (stored)",
                   {200: "Component", 201: "Component"}, (*WRITE, 409), "ComponentInput",
                   tags=["components"]),
        "patch": _op("patchComponent", "Change some of a component's credentials or its note",
                     {200: "Component"}, (*WRITE, 404, 409), "ComponentInput", tags=["components"]),
        "delete": _op("disconnectComponent", "Disconnect the component's session",
                      {202: "Disconnected"}, (404, 409, 422), tags=["components"]),
    },
    f"{P}/components/{{domain}}/credentials": {
        "parameters": [DOMAIN],
        "delete": _op("deleteComponentCredentials", "Forget a stored component (the file's "
                      "entry, if any, applies again)", {200: "Component", 204: None},
                      (404, 409, 422, 503), tags=["components"])},
    f"{P}/diagnose/{{domain}}": {
        "parameters": [DOMAIN],
        "post": _op("diagnose", "Try to federate with a domain now; every step as data",
                    {200: "Diagnosis"}, (400, 413, 415, 422), "DiagnoseInput", body_required=False,
                    tags=["diagnose"])},
    f"{P}/cluster": {"get": _op("getCluster", "Every cluster node with its health, components, "
                                "S2S streams and destinations (404 on a single node; 503 while "
                                "Redis cannot be read)", {200: "Cluster"}, (404, 503),
                                tags=["cluster"])},
    f"{P}/openapi.json": {"get": _op("getOpenApi", "This document", {200: "Status"},
                                     tags=["meta"])},
    "/metrics": {"get": {
        "operationId": "getMetrics", "summary": "Prometheus metrics (text format)",
        "tags": ["meta"],
        "description": "The token is required unless admin.metrics_open allows loopback scrapers.",
        "responses": {"200": {"description": "Metrics", "content": {"text/plain": {
            "schema": {"type": "string"}}}},
            "401": {"description": _ERRORS[401], "content": {"application/json": {
                "schema": _ref("Error")}}}}}},
}
# The document describes itself as an object, not a Status.
PATHS[f"{P}/openapi.json"]["get"]["responses"]["200"] = {
    "description": "OpenAPI document", "content": {"application/json": {"schema": {"type": "object"}}}}


def document(version: str) -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "fedgate admin API", "version": version,
                 "description": "Manage an XMPP federation gateway: peer policy, connections, "
                                "destinations, components, diagnostics.  Every route needs "
                                "'Authorization: Bearer <token>'."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": PATHS,
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"}}},
    }
