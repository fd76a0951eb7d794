"""Policy export and import: every stored record of one backend as one JSON
document, and back into any backend (``fedgatectl policy export|import``).

This is how a single node's SQLite state moves into a cluster's Redis (and
back), and how either is backed up.  The document holds peer policies,
settings (the federation mode and default policy) and component
credentials, secrets included (XEP-0114 secrets, salted SCRAM keys): keep
it as private as the store itself.  Writes go through the Storage
interface, so importing into Redis announces every record to the running
nodes, which apply it at once; a running single node reads its SQLite file
only at start, so import into SQLite with it stopped (or restart it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

from twisted.internet import defer

from fedgate.policy import PeerPolicy
from fedgate.storage.interface import ComponentCredential

FORMAT = "fedgate-policy"
VERSION = 1


class TransferError(Exception):
    """The document cannot be imported; says where and why."""


def _peer_json(peer: PeerPolicy) -> dict:
    data = asdict(peer)
    data["addresses"] = [[host, int(port)] for host, port in peer.addresses]
    return data


def _component_json(record: ComponentCredential) -> dict:
    data = asdict(record)
    data["allowed"] = list(record.allowed)
    data["certificate_sha256"] = list(record.certificate_sha256)
    return data


@defer.inlineCallbacks
def export_store(storage):
    """Fires with the JSON-able document of everything ``storage`` holds."""
    peers = yield storage.peers()
    settings = yield storage.settings()
    components = yield storage.components()
    return {"format": FORMAT, "version": VERSION,
            "peers": [_peer_json(p) for p in peers],
            "settings": settings,
            "components": [_component_json(c) for c in components]}


def _records(data: dict, key: str, record, normalise) -> list:
    """The entries of ``data[key]`` as ``record`` instances (``normalise``
    turns JSON lists into the tuples the record holds); :class:`TransferError`
    naming the entry for anything wrong."""
    known = {f.name for f in fields(record)}
    records = []
    for index, item in enumerate(data.get(key) or []):
        where = f"{key}[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("domain"), str):
            raise TransferError(f"{where}: expected an object with a domain")
        unknown = set(item) - known
        if unknown:
            raise TransferError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        try:
            records.append(record(**normalise(item)))
        except (TypeError, ValueError) as exc:
            raise TransferError(f"{where} ({item.get('domain')}): {exc}") from None
    return records


def parse_document(data: Any) -> tuple[list[PeerPolicy], dict, list[ComponentCredential]]:
    """The records of an export document; :class:`TransferError` naming the
    entry for anything wrong, before anything is written."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TransferError(f"not a fedgate policy export (expected \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise TransferError(f"export version {data.get('version')!r}; this fedgate reads {VERSION}")
    peers = _records(data, "peers", PeerPolicy, lambda item: dict(
        item, addresses=tuple((str(h), int(p)) for h, p in item.get("addresses") or ())))
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise TransferError("settings: expected an object")
    components = _records(data, "components", ComponentCredential, lambda item: dict(
        item, allowed=tuple(item.get("allowed") or ()),
        certificate_sha256=tuple(item.get("certificate_sha256") or ())))
    return peers, settings, components


@defer.inlineCallbacks
def import_store(storage, data: Any, replace: bool = False):
    """Write the document's records into ``storage``; with ``replace``,
    remove stored records the document does not have.  Fires with counts:
    {"peers": n, "settings": n, "components": n, "removed": n}."""
    peers, settings, components = parse_document(data)
    counts = {"peers": 0, "settings": 0, "components": 0, "removed": 0}
    for peer in peers:
        yield storage.put_peer(peer)
        counts["peers"] += 1
    for name, value in sorted(settings.items()):
        yield storage.put_setting(name, value)
        counts["settings"] += 1
    for record in components:
        yield storage.put_component(record)
        counts["components"] += 1
    if replace:
        keep_peers = {p.domain for p in (yield defer.gatherResults(
            [storage.get_peer(p.domain) for p in peers])) if p is not None}
        for stored in (yield storage.peers()):
            if stored.domain not in keep_peers:
                counts["removed"] += int((yield storage.delete_peer(stored.domain)))
        for name in (yield storage.settings()):
            if name not in settings:
                counts["removed"] += int((yield storage.delete_setting(name)))
        keep_components = {c.domain for c in (yield defer.gatherResults(
            [storage.get_component(c.domain) for c in components])) if c is not None}
        for stored in (yield storage.components()):
            if stored.domain not in keep_components:
                counts["removed"] += int((yield storage.delete_component(stored.domain)))
    return counts


def dumps(document: dict) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
