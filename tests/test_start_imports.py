"""Memory at start: ``twistd fedgate`` imports only what its configuration
uses.  Without an ``[admin] listen`` the HTTP stack (twisted.web's server,
the admin routes), the metrics (prometheus_client) stay out of the process;
wokkel loads at the first disco#info query, hypothesis never; with the
cluster off, neither the Redis client nor redis-py.  Each case runs a fresh
``twistd`` and reads its ``sys.modules`` once it serves.  Once started, the
gateway hands the C heap's free pages back (fedgate.tap.release_free_heap)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
from twisted.application import service
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from fedgate.tap import ExitOnStartFailure, release_free_heap
from tests.support.twistd import REPO, free_ports, loopback_config

#: Runs twistd in this process, then writes sys.modules once the gateway
#: logged that it serves (or after 30 s), and stops.
RUNNER = r'''
import json, sys
from twisted.internet import reactor
from twisted.scripts.twistd import run
config, log, out = sys.argv[1:4]
waited = [0]
def check():
    waited[0] += 1
    try:
        serving = "fedgate serving" in open(log).read()
    except OSError:
        serving = False
    if serving or waited[0] > 300:
        with open(out, "w") as f:
            json.dump({"serving": serving, "modules": sorted(sys.modules)}, f)
        reactor.stop()
    else:
        reactor.callLater(0.1, check)
reactor.callWhenRunning(check)
sys.argv = ["twistd", "-n", "--pidfile=", "--logfile", log, "fedgate", "--config", config]
run()
'''

ADMIN_ONLY = ("twisted.web.server", "twisted.web.resource", "prometheus_client", "fedgate.metrics",
              "fedgate.admin.web", "fedgate.admin.channel", "fedgate.admin.resources",
              "fedgate.admin.diagnose")
NEVER = ("hypothesis", "treq", "wokkel")
CLUSTER_ONLY = ("fedgate.cluster.redisclient", "fedgate.cluster.relay", "fedgate.cluster.membership",
                "fedgate.cluster.sync", "fedgate.storage.redis", "redis")


def modules_after_start(tmp_path, admin: bool) -> set[str]:
    s2s, comp, admin_port = free_ports(3)
    text = loopback_config(tmp_path, s2s, comp, admin_port)
    if not admin:
        text = text.replace(f'listen = ["tcp:{admin_port}:interface=127.0.0.1"]', "listen = []")
    config = tmp_path / "fedgate.toml"
    config.write_text(text)
    out, log = tmp_path / "modules.json", tmp_path / "twistd.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", RUNNER, str(config), str(log), str(out)], cwd=tmp_path,
                   env=env, check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    found = json.loads(out.read_text())
    assert found["serving"], log.read_text()
    return set(found["modules"])


@pytest.fixture(scope="module")
def modules_without_admin(tmp_path_factory):
    """One gateway without an admin listener and with the cluster off."""
    return modules_after_start(tmp_path_factory.mktemp("no-admin"), admin=False)


def test_without_an_admin_listener_the_admin_and_metrics_stacks_stay_out(modules_without_admin):
    modules = modules_without_admin
    assert "fedgate.service" in modules and "fedgate.admin.registry" in modules
    loaded = [m for m in ADMIN_ONLY + NEVER if m in modules]
    assert not loaded, loaded


def test_with_the_cluster_off_the_redis_client_stays_out(modules_without_admin):
    # [cluster] is still parsed (its redis address checked), through
    # fedgate.cluster.address alone
    assert "fedgate.cluster.address" in modules_without_admin
    loaded = [m for m in CLUSTER_ONLY if m in modules_without_admin]
    assert not loaded, loaded


def test_with_an_admin_listener_they_load(tmp_path):
    modules = modules_after_start(tmp_path, admin=True)
    missing = [m for m in ADMIN_ONLY if m not in modules]
    assert not missing, missing
    loaded = [m for m in NEVER if m in modules]
    assert not loaded, loaded


def test_wokkel_loads_at_the_first_disco_query():
    code = """
import sys
from fedgate.local import LocalHandler
from fedgate.stream.stanza import Stanza
from twisted.words.xish import domish
assert "wokkel" not in sys.modules
class Router:
    def __init__(self): self.routed = []
    def route(self, element): self.routed.append(element)
    def bounce(self, *args, **kwargs): raise AssertionError("bounced")
router = Router()
handler = LocalHandler(router)
assert "wokkel" not in sys.modules
iq = domish.Element((None, "iq"))
iq["type"], iq["id"], iq["to"], iq["from"] = "get", "d1", "gw.example", "a.example"
iq.addElement(("http://jabber.org/protocol/disco#info", "query"))
handler.handle(Stanza.of(iq))
assert "wokkel.disco" in sys.modules
print(router.routed[0].toXml())
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "<identity category='server' type='im'" in done.stdout, done.stdout
    assert "<feature var='urn:xmpp:ping'/>" in done.stdout, done.stdout


class Started(service.Service):
    """A gateway stand-in whose start fires (or fails) when told to."""

    def __init__(self):
        self.starting = defer.Deferred()

    def startService(self):
        super().startService()
        return self.starting


def test_the_free_heap_is_released_once_the_gateway_has_started():
    gateway, released = Started(), []
    starter = ExitOnStartFailure(gateway, MemoryReactorClock(), lambda status: None,
                                 release_heap=lambda: released.append(True))
    starter.startService()
    assert released == []  # not while the listeners are still opening
    gateway.starting.callback(None)
    assert released == [True]


def test_a_failed_start_releases_nothing():
    gateway, released, statuses = Started(), [], []
    starter = ExitOnStartFailure(gateway, MemoryReactorClock(), statuses.append,
                                 release_heap=lambda: released.append(True))
    starter.startService()
    gateway.starting.errback(RuntimeError("storage is gone"))
    assert (released, statuses) == ([], [1])


def test_release_free_heap_trims_on_glibc():
    # Both test stacks run on glibc, which has malloc_trim; elsewhere it is a no-op.
    assert release_free_heap() is (platform.libc_ver()[0] == "glibc")
