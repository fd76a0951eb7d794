"""The Debian package: what debian/ must keep in step with the tree, and,
where the machine allows it (root with apt, as on CI), the whole round trip
by scripts/check-debian-package: build, lintian, install, run the unit's
ExecStart as the fedgate user, remove, purge.

The round trip runs once per scripts/test: in its run on Debian's python3
stack, the stack the package runs on, and is skipped with that reason in
the run on the newest releases.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEBIAN = REPO / "debian"
CHECK = REPO / "scripts" / "check-debian-package"

EXEC_START = "/usr/bin/twistd3 --nodaemon --pidfile= fedgate --config /etc/fedgate/fedgate.toml"
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallArchitectures": "native",
}
# setup.cfg's requirement names -> Debian bookworm's packages.
DEBIAN_NAMES = {
    "twisted": "python3-twisted",
    "pyopenssl": "python3-openssl",
    "service-identity": "python3-service-identity",
    "cryptography": "python3-cryptography",
    "idna": "python3-idna",
    "wokkel": "python3-wokkel",
    "treq": "python3-treq",
    "prometheus-client": "python3-prometheus-client",
}


def unit() -> dict:
    """fedgate.service as {key: [values]} (keys may repeat)."""
    entries: dict = {}
    for line in (DEBIAN / "fedgate.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key, []).append(value)
    return entries


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def test_changelog_version_is_the_setup_cfg_version():
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.match(r"fedgate \(([^)]+)\) ", first)
    assert match, first
    assert match.group(1) == setup_cfg()["metadata"]["version"]


def test_unit_runs_twistd3_as_fedgate_and_stops_retrying_on_config_errors():
    entries = unit()
    assert entries["ExecStart"] == [EXEC_START]
    assert entries["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # fedgate.tap: SIGHUP reloads
    assert entries["User"] == entries["Group"] == ["fedgate"]
    assert entries["StateDirectory"] == ["fedgate"]
    assert entries["Restart"] == ["on-failure"]
    assert entries["RestartPreventExitStatus"] == ["78"]  # fedgate.tap's EX_CONFIG (73, a bind failure, is retried)
    assert entries["LimitNOFILE"] == ["65536"]  # fedgate.tap raises the soft limit to it
    for key, value in HARDENING.items():
        assert entries.get(key) == [value], key
    assert entries["SystemCallFilter"][0] == "@system-service"


def test_every_runtime_requirement_is_a_build_dependency():
    """The build-time tests import them all; a requirement added to setup.cfg
    without its Debian package would only fail on a clean build machine."""
    requires = [r for r in setup_cfg()["options"]["install_requires"].split("\n") if r.strip()]
    control = (DEBIAN / "control").read_text()
    for requirement in requires:
        name = re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")
        assert name in DEBIAN_NAMES, f"map {name!r} to its Debian package in DEBIAN_NAMES"
        assert re.search(rf"^ {re.escape(DEBIAN_NAMES[name])}( <!nocheck>)?,$", control, re.M), name


def test_plugin_goes_where_python3_twisted_looks():
    # Installed with the modules (pip and pybuild alike) into
    # site-packages/twisted/plugins, never as data under the prefix.
    options = setup_cfg()["options"]
    assert options["packages"] == "find_namespace:"
    assert "twisted.plugins" in setup_cfg()["options.packages.find"]["include"].split()
    assert not setup_cfg().has_section("options.data_files")
    assert "activate-noawait twisted-plugins-cache" in (DEBIAN / "fedgate.triggers").read_text()
    # Never a package: python3-twisted owns twisted/ and twisted/plugins/.
    assert not (REPO / "twisted" / "__init__.py").exists()
    assert not (REPO / "twisted" / "plugins" / "__init__.py").exists()


def _round_trip_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (it installs packages)"
    for tool in ("apt-get", "dpkg-buildpackage", "git"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            return f"needs {tool}"
    if sys.prefix != sys.base_prefix or not os.path.realpath(sys.executable).startswith("/usr/bin/"):
        return ("runs once per scripts/test, in its run on Debian's python3 "
                "(or run scripts/check-debian-package)")
    return None


@pytest.mark.timeout(1200)
@pytest.mark.skipif(_round_trip_unavailable() is not None, reason=str(_round_trip_unavailable()))
def test_build_install_run_remove_purge(tmp_path):
    log = tmp_path / "check-debian-package.log"
    with open(log, "w") as out:
        # This run of the suite covers the end-to-end and fuzz tests on this
        # same stack: the build-time run leaves them out (debian/rules).
        env = dict(os.environ, DEB_BUILD_OPTIONS="fedgate-no-e2e")
        proc = subprocess.Popen([str(CHECK)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO, env=env)
        try:
            returncode = proc.wait(timeout=1100)
        finally:
            if proc.poll() is None:
                proc.terminate()  # the script purges the package on SIGTERM
                proc.wait(timeout=60)
    output = log.read_text()
    tail = "\n".join(output.splitlines()[-60:])
    assert returncode == 0, f"scripts/check-debian-package exited {returncode}:\n{tail}"
    assert "FAIL" not in output, tail
    oks = [line for line in output.splitlines() if line.startswith("ok   ")]
    for expected in [
        "ok   build-time tests: ",
        "ok   plugin ships as /usr/lib/python3/dist-packages/twisted/plugins/fedgate_plugin.py",
        "ok   no dropin.cache, no twisted/plugins/__init__.py, nothing under /usr/twisted",
        "ok   conffiles: /etc/fedgate/fedgate.toml",
        "ok   lintian: no errors, no warnings",
        "ok   user home and shell: /var/lib/fedgate /usr/sbin/nologin",
        "ok   /etc/fedgate/fedgate.toml: root:fedgate 640",
        "ok   /etc/fedgate/certs: root:fedgate 750",
        "ok   /var/lib/fedgate: fedgate:fedgate 750",
        "ok   other users cannot read /etc/fedgate/fedgate.toml",
        "ok   /etc/fedgate/fedgate.toml under an override, after configure: root:root 600",
        "ok   plugin cache /usr/lib/python3/dist-packages/twisted/plugins/dropin.cache lists fedgate_plugin",
        "ok   twistd3 --help lists: fedgate ",
        "ok   systemd-analyze verify /lib/systemd/system/fedgate.service: no output",
        "ok   exit status: 78",
        "ok   journal line: fedgate: configuration error: ",
        "ok   first start: exit status: 78",
        "ok   first start: journal line: fedgate: certificate error: /etc/fedgate/fedgate.toml: ",
        "ok   ran the README's one-liner",
        "ok   /etc/fedgate/certs/example.org.key: root:fedgate 640",
        "answered with a stream header from example.org offering STARTTLS",
        "with the one-liner's certificate for example.org",
        "ok   the stream after TLS offers dialback",
        "ok   gateway process user: fedgate",
        "ok   /var/lib/fedgate/dialback.secret: fedgate:fedgate 600",
        "ok   /usr/bin/fedgatectl and its manual page",
        "ok   /var/lib/fedgate/admin.token: fedgate:fedgate 640",
        "ok   GET /api/v1/status with the token: 200",
        "ok   GET /api/v1/status without a token: 401",
        "ok   fedgatectl --help",
        "ok   fedgatectl status as fedgate-test-admin (group fedgate)",
        "ok   fedgatectl with a wrong token: exit 77",
        "ok   SIGHUP: the gateway reloaded ",
        "ok   SIGHUP: still serving",
        "ok   dpkg status: config-files",
        "ok   plugin and its cache entry are gone",
        "ok   dpkg status: not-installed",
        "ok   /etc/fedgate and /var/lib/fedgate are gone",
        "ok   no file or directory named *fedgate* in ",
    ]:
        assert any(expected in line for line in oks), f"no {expected!r} line:\n{tail}"
    assert output.rstrip().endswith("== all checks passed"), tail
