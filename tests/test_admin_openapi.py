"""The OpenAPI document matches the routes, both ways, and real responses
match its schemas (checked with a small JSON Schema subset validator)."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from fedgate.admin.openapi import document
from tests.test_admin_api import V1, AdminCase

HTTP_METHODS = ("get", "put", "patch", "post", "delete")


def validate(schema: dict, value, components: dict, where: str = "$") -> list[str]:
    """Errors of ``value`` against ``schema`` (type, enum, required,
    properties, additionalProperties, items, $ref, min/maxLength)."""
    if "$ref" in schema:
        return validate(components[schema["$ref"].rsplit("/", 1)[1]], value, components, where)
    errors = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        checks = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
                  "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
                  "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
                  "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                  "null": lambda v: v is None}
        if not any(checks[k](value) for k in kinds):
            return [f"{where}: {value!r} is not {kinds}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{where}: missing {name}")
        for name, item in value.items():
            if name in props:
                errors += validate(props[name], item, components, f"{where}.{name}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unexpected {name}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += validate(schema["items"], item, components, f"{where}[{index}]")
    return errors


class DocumentShapeTests(unittest.TestCase):
    def test_every_reference_resolves(self):
        doc = document("1")
        schemas = doc["components"]["schemas"]

        def walk(node):
            if isinstance(node, dict):
                ref = node.get("$ref")
                if ref is not None:
                    self.assertIn(ref.rsplit("/", 1)[1], schemas, ref)
                for child in node.values():
                    walk(child)
            elif isinstance(node, list):
                for child in node:
                    walk(child)
        walk(doc)
        self.assertEqual(doc["openapi"], "3.1.0")
        ids = [op["operationId"] for item in doc["paths"].values()
               for method, op in item.items() if method in HTTP_METHODS]
        self.assertEqual(len(ids), len(set(ids)), "operationIds are unique")

    def test_validator(self):
        schemas = {"X": {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}},
                         "additionalProperties": False}}
        self.assertEqual(validate({"$ref": "#/components/schemas/X"}, {"a": 1}, schemas), [])
        self.assertTrue(validate({"$ref": "#/components/schemas/X"}, {"a": True}, schemas))
        self.assertTrue(validate({"$ref": "#/components/schemas/X"}, {"a": 1, "b": 2}, schemas))
        self.assertTrue(validate({"$ref": "#/components/schemas/X"}, {}, schemas))


class OpenApiTests(AdminCase):
    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        got = yield self.api.get(f"{V1}/openapi.json")
        self.doc = got.json
        self.schemas = self.doc["components"]["schemas"]

    def test_routes_and_document_agree(self):
        served = {(r.method.lower(), r.template) for r in self.a.admin.api.routes()}
        documented = {(method, path) for path, item in self.doc["paths"].items()
                      for method in item if method in HTTP_METHODS}
        self.assertEqual(served - documented, set(), "routes missing from the document")
        self.assertEqual(documented - served, set(), "documented operations not served")
        for path, item in self.doc["paths"].items():
            names = {p["name"] for p in item.get("parameters", [])}
            self.assertEqual(names, {part[1:-1] for part in path.split("/") if part.startswith("{")}, path)

    def check(self, answer, method: str, template: str):
        """``answer`` is a documented response of that operation, and its
        JSON body matches the documented schema."""
        op = self.doc["paths"][template][method]
        response = op["responses"].get(str(answer.status))
        self.assertIsNotNone(response, f"{method} {template} answered {answer.status}, undocumented")
        content = response.get("content")
        if content is None:
            self.assertEqual(answer.body, b"")
            return
        if "application/json" in content:
            errors = validate(content["application/json"]["schema"], answer.json, self.schemas)
            self.assertEqual(errors, [], f"{method} {template}")

    @defer.inlineCallbacks
    def test_responses_match_schemas(self):
        yield self.federate()
        [out] = [r for r in self.a.table if r.direction == "outbound"]
        calls = [
            ("get", "/status", None, f"{V1}/status"),
            ("get", "/policy", None, f"{V1}/policy"),
            ("patch", "/policy", {"mode": "open"}, f"{V1}/policy"),
            ("put", "/policy", {"mode": "open", "default": {}}, f"{V1}/policy"),
            ("put", "/policy", {"mode": "x", "default": {}}, f"{V1}/policy"),
            ("delete", "/policy", None, f"{V1}/policy"),
            ("get", "/peers", None, f"{V1}/peers"),
            ("put", "/peers/{domain}", {"note": "n", "addresses": ["127.0.0.1:5999"]}, f"{V1}/peers/p.example"),
            ("put", "/peers/{domain}", {"note": "again"}, f"{V1}/peers/p.example"),
            ("put", "/peers/{domain}", {"bad": 1}, f"{V1}/peers/p.example"),
            ("get", "/peers/{domain}", None, f"{V1}/peers/p.example"),
            ("patch", "/peers/{domain}", {"allowed": False}, f"{V1}/peers/p.example"),
            ("patch", "/peers/{domain}", {"allowed": False}, f"{V1}/peers/none.example"),
            ("delete", "/peers/{domain}", None, f"{V1}/peers/p.example"),
            ("delete", "/peers/{domain}", None, f"{V1}/peers/static.example"),
            ("get", "/peers/{domain}", None, f"{V1}/peers/a..b"),
            ("get", "/connections", None, f"{V1}/connections"),
            ("get", "/connections", None, f"{V1}/connections?state=x"),
            ("get", "/connections/{id}", None, f"{V1}/connections/{out.id}"),
            ("get", "/connections/{id}", None, f"{V1}/connections/0"),
            ("get", "/destinations", None, f"{V1}/destinations"),
            ("get", "/destinations/{domain}", None, f"{V1}/destinations/chat.b.example"),
            ("post", "/destinations/{domain}/reset", None, f"{V1}/destinations/chat.b.example/reset"),
            ("get", "/destinations/{domain}", None, f"{V1}/destinations/none.example"),
            ("get", "/components", None, f"{V1}/components"),
            ("get", "/components/{domain}", None, f"{V1}/components/chat.a.example"),
            ("put", "/components/{domain}", {"secret": "s" * 20}, f"{V1}/components/new.a.example"),
            ("put", "/components/{domain}", {"secret": "s"}, f"{V1}/components/new.a.example"),
            ("delete", "/components/{domain}", None, f"{V1}/components/new.a.example"),
            ("delete", "/components/{domain}/credentials", None, f"{V1}/components/new.a.example/credentials"),
            ("delete", "/components/{domain}/credentials", None, f"{V1}/components/chat.a.example/credentials"),
            ("post", "/diagnose/{domain}", {"method": "dialback"}, f"{V1}/diagnose/b.example"),
            ("post", "/diagnose/{domain}", {"from": "x"}, f"{V1}/diagnose/b.example"),
            ("get", "/openapi.json", None, f"{V1}/openapi.json"),
            ("get", "/cluster", None, f"{V1}/cluster"),  # a single node: 404
            ("delete", "/connections/{id}", None, f"{V1}/connections/{out.id}"),
            ("delete", "/components/{domain}", None, f"{V1}/components/chat.a.example"),
        ]
        for method, template, body, url in calls:
            kwargs = {} if body is None else {"body": body}
            answer = yield self.api.request(method.upper(), url, **kwargs)
            self.check(answer, method, V1 + template)
        metrics = yield self.api.get("/metrics")
        self.assertIn("text/plain", self.doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"])
        self.assertEqual(metrics.status, 200)
        unauthorised = yield self.api.get(f"{V1}/peers", token=None)
        self.check(unauthorised, "get", f"{V1}/peers")
