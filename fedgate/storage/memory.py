"""An in-memory backend: nothing survives the process.

For unit tests and for running without a state directory; it passes the same
contract test as the SQLite backend, which keeps the contract honest about
what is backend-specific.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from twisted.internet import defer

from fedgate.domain import normalize_domain
from fedgate.policy import PeerPolicy
from fedgate.storage.interface import ComponentCredential, StorageError, normalized_component


class MemoryStorage:
    def __init__(self):
        self._peers: dict[str, PeerPolicy] = {}
        self._settings: dict[str, str] = {}
        self._components: dict[str, ComponentCredential] = {}
        self._open = False

    def _run(self, fn, *args) -> defer.Deferred:
        if not self._open:
            return defer.fail(StorageError("the store is closed"))
        return defer.maybeDeferred(fn, *args)

    def open(self) -> defer.Deferred:
        self._open = True
        return defer.succeed(None)

    def close(self) -> defer.Deferred:
        self._open = False
        return defer.succeed(None)

    def peers(self) -> defer.Deferred:
        return self._run(lambda: [self._peers[d] for d in sorted(self._peers)])

    def get_peer(self, domain: str) -> defer.Deferred:
        return self._run(lambda: self._peers.get(normalize_domain(domain)))

    def put_peer(self, policy: PeerPolicy) -> defer.Deferred:
        def put():
            key = normalize_domain(policy.domain)
            new = key not in self._peers
            self._peers[key] = replace(policy, domain=key)
            return new
        return self._run(put)

    def delete_peer(self, domain: str) -> defer.Deferred:
        return self._run(lambda: self._peers.pop(normalize_domain(domain), None) is not None)

    def settings(self) -> defer.Deferred:
        return self._run(lambda: {k: json.loads(v) for k, v in sorted(self._settings.items())})

    def put_setting(self, name: str, value: Any) -> defer.Deferred:
        return self._run(lambda: self._settings.__setitem__(name, json.dumps(value)))

    def delete_setting(self, name: str) -> defer.Deferred:
        return self._run(lambda: self._settings.pop(name, None) is not None)

    def components(self) -> defer.Deferred:
        return self._run(lambda: [self._components[d] for d in sorted(self._components)])

    def get_component(self, domain: str) -> defer.Deferred:
        return self._run(lambda: self._components.get(normalize_domain(domain)))

    def put_component(self, credential: ComponentCredential) -> defer.Deferred:
        def put():
            record = normalized_component(credential)
            new = record.domain not in self._components
            self._components[record.domain] = record
            return new
        return self._run(put)

    def delete_component(self, domain: str) -> defer.Deferred:
        return self._run(lambda: self._components.pop(normalize_domain(domain), None) is not None)
