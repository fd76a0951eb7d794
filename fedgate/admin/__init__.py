"""The admin side of the gateway: a REST API (twisted.web, JSON under
/api/v1/) over the live tables, persistent peer policy and component
credentials, Prometheus metrics, and a federation diagnosis.

Modules: ``web`` (one leaf resource: auth, path checks, routing, JSON),
``auth`` (the bearer token), ``resources`` (the routes), ``views`` (JSON in
and out), ``registry`` (config and storage layers), ``enforce`` (policy on
live connections), ``diagnose``, ``openapi``, and ``service`` (wiring).
"""
