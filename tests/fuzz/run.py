"""The in-process fuzz run: hypothesis cases per role, the oracle of
:mod:`tests.fuzz.roles`, and figures at the end.

    PYTHONPATH=. python -m tests.fuzz.run --examples 100000 [--seed N] [--roles ...]

``--examples`` is the total over the roles (split evenly).  Without
``--seed`` a random seed is drawn and printed, so a failing run can be
repeated exactly.
"""

from __future__ import annotations

import argparse
import base64
import secrets
import sys
import time

from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings, strategies as st

from fedgate.stream import namespaces as ns
from tests.fuzz.grammar import Sym, db_verify, script, stanza, component_iq
from tests.fuzz.roles import ROLES, Stats, run_case

#: cases per hypothesis run in the long run
CHUNK = 2000
#: CI's fixed seed (the random one is printed by tests/conftest.py)
FIXED_SEED = 20261205

S2S_HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' "
              "xmlns:stream='http://etherx.jabber.org/streams' {attrs} version='1.0'>")
IN_HEADER = S2S_HEADER.format(attrs="to='gw.example' from='remote.example'").encode()
PEER_HEADER = S2S_HEADER.format(attrs="id='SID' from='remote.example' to='gw.example'").encode()
FEATURES_DB = (f"<stream:features><dialback xmlns='{ns.DIALBACK_FEATURE}'><errors/></dialback>"
               f"<bidi xmlns='{ns.BIDI_FEATURE}'/></stream:features>").encode()
FEATURES_TLS = (f"<stream:features><starttls xmlns='{ns.TLS}'/><dialback xmlns='{ns.DIALBACK_FEATURE}'/>"
                "</stream:features>").encode()
FEATURES_SASL = (f"<stream:features><mechanisms xmlns='{ns.SASL}'><mechanism>EXTERNAL</mechanism></mechanisms>"
                 f"<dialback xmlns='{ns.DIALBACK_FEATURE}'/><bidi xmlns='{ns.BIDI_FEATURE}'/></stream:features>").encode()
PROCEED = f"<proceed xmlns='{ns.TLS}'/>".encode()
STARTTLS = f"<starttls xmlns='{ns.TLS}'/>".encode()
BIDI = f"<bidi xmlns='{ns.BIDI}'/>".encode()
EXTERNAL = f"<auth xmlns='{ns.SASL}' mechanism='EXTERNAL'>=</auth>".encode()
CLOSE = b"</stream:stream>"
WAIT = Sym("wait", 0.1)
C0114_HEADER = (b"<stream:stream xmlns='jabber:component:accept' "
                b"xmlns:stream='http://etherx.jabber.org/streams' to='chat.gw.example'>")
C0225_HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
                b"xmlns:stream='http://etherx.jabber.org/streams' to='gw.example' from='bots.example' version='1.0'>")
PLAIN = (f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>"
         + base64.b64encode(b"\0bots.example\0fuzz password").decode() + "</auth>").encode()


def db_result(sender, to, body="valid", kind=None):
    kind_attr = f" type='{kind}'" if kind else ""
    return f"<db:result from='{sender}' to='{to}'{kind_attr}>{body if not kind else ''}</db:result>".encode()


def _inbound_happy(variant):
    if variant["direct_tls"]:
        start = [Sym("tls_done", "remote.example"), IN_HEADER, EXTERNAL, IN_HEADER]
    elif variant["tls"]:
        start = [IN_HEADER, STARTTLS, Sym("tls_done", "remote.example"), IN_HEADER, EXTERNAL, IN_HEADER]
    else:
        start = [IN_HEADER, db_result("remote.example", "gw.example"), WAIT]
    return start + [
        stanza(sender="a@remote.example", to="b@gw.example"), BIDI,
        db_result("remote.example", "chat.gw.example", "never"),
        db_result("remote.example", "muc.gw.example"), WAIT,
        stanza(sender="a@remote.example", to="room@muc.gw.example"),
        db_verify(sender="remote.example", to="gw.example"),
        db_result("other.example", "gw.example"), stanza(), CLOSE]


def _outbound_happy(variant):
    if variant["tls"]:
        # (no certificate of ours here: dialback over TLS, as without SASL)
        start = [PEER_HEADER, FEATURES_TLS, PROCEED, Sym("tls_done", "remote.example"), PEER_HEADER,
                 FEATURES_SASL, db_result("remote.example", "gw.example", kind="valid")]
    else:
        start = [PEER_HEADER, FEATURES_DB, db_result("remote.example", "gw.example", kind="valid")]
    return start + [
        Sym("send", "gw.example"), stanza(sender="a@remote.example", to="b@gw.example"),
        Sym("authenticate", "chat.gw.example"),
        db_result("remote.example", "chat.gw.example", kind="valid"), Sym("send", "chat.gw.example"),
        Sym("authenticate", "muc.gw.example"), db_result("remote.example", "muc.gw.example", kind="error"),
        db_verify(sender="remote.example", to="gw.example"),
        db_result("remote.example", "gw.example", "valid"), stanza(), CLOSE]


def _verify_happy(variant):
    answer = f"<db:verify from='remote.example' to='gw.example' id='SID' type='{variant['answer']}'>KEY</db:verify>"
    if variant["tls"]:
        start = [PEER_HEADER, FEATURES_TLS, PROCEED, Sym("tls_done", "remote.example"), PEER_HEADER, FEATURES_DB]
    else:
        start = [PEER_HEADER, FEATURES_DB]
    return start + [answer.encode(), CLOSE]


def _component_happy(variant):
    if variant["protocol"] == "0114":
        return [C0114_HEADER, Sym("handshake", "chat.gw.example"),
                stanza(sender="x@chat.gw.example", to="y@remote.example"),
                stanza(sender="x@chat.gw.example", to="gw.example"), Sym("handshake", "chat.gw.example"),
                stanza(), CLOSE]
    start = [C0225_HEADER]
    if variant["require_tls"] or variant["plain"]:
        start += [STARTTLS, Sym("tls_done", "bots.example"), C0225_HEADER]
    if variant["plain"]:
        start.append(PLAIN)
    else:
        algorithm = variant["scram"]
        start += [Sym("scram_first", {"sha1": "SCRAM-SHA-1", "sha256": "SCRAM-SHA-256"}[algorithm]),
                  Sym("scram_final", algorithm)]
    bind = ("<iq type='set' id='b'><bind xmlns='urn:xmpp:component:0'><hostname>weather.example"
            "</hostname></bind></iq>").encode()
    unbind = bind.replace(b"bind", b"unbind")
    return start + [C0225_HEADER, bind, stanza(sender="a@weather.example", to="b@remote.example"),
                    component_iq(), stanza(), unbind, CLOSE]


b = st.booleans()
VARIANTS = {
    "parser": st.fixed_dictionaries({"tight": b}),
    "s2s-in": st.fixed_dictionaries({"tight": b, "tls": b, "direct_tls": st.sampled_from([False, False, True]),
                                     "bidi": b, "encryption": st.sampled_from(["optional", "required"])}),
    "s2s-out": st.fixed_dictionaries({"tight": b, "tls": b, "bidi": b,
                                      "encryption": st.sampled_from(["optional", "required"])}),
    "s2s-verify": st.fixed_dictionaries({"tight": b, "tls": b,
                                         "answer": st.sampled_from(["valid", "invalid", "error"])}),
    "component": st.fixed_dictionaries({"tight": b, "protocol": st.sampled_from(["0114", "0225"]),
                                        "require_tls": b, "plain": b,
                                        "scram": st.sampled_from(["sha1", "sha256"])}),
}
HAPPY = {"parser": lambda v: [IN_HEADER, db_result("remote.example", "gw.example"), stanza(), CLOSE],
         "s2s-in": _inbound_happy, "s2s-out": _outbound_happy, "s2s-verify": _verify_happy,
         "component": _component_happy}


#: the grammar items only one kind of role has a use for
EXTRA = {
    "component": st.sampled_from((Sym("handshake", "chat.gw.example"), Sym("handshake", "muc.gw.example"),
                                  Sym("scram_final", "sha1"), C0114_HEADER, C0225_HEADER)),
    "s2s": st.sampled_from((Sym("tls_done", "remote.example"), IN_HEADER, PEER_HEADER,
                            Sym("authenticate", "chat.gw.example"), Sym("send", "gw.example"))),
}


@st.composite
def cases(draw, role: str):
    variant = draw(VARIANTS[role])
    extra = EXTRA.get("s2s" if role.startswith("s2s") else role)
    return variant, draw(script(HAPPY[role](variant), (extra,) if extra is not None else ()))


def fuzz(role: str, seed: int, examples: int, stats: Stats) -> None:
    """Run ``examples`` hypothesis cases of ``role`` from ``seed`` (a
    failure is shrunk and raised with the case that shows it)."""

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=(Phase.generate, Phase.shrink),
              report_multiple_bugs=False)
    @hypothesis_seed(seed)
    @given(case=cases(role))
    def check(case):
        variant, steps = case
        stats.add(run_case(role, variant, steps))

    check()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100_000, help="cases in all (split over the roles)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--roles", nargs="*", default=list(ROLES))
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 32)
    per_role = max(1, args.examples // len(args.roles))
    print(f"in-process fuzz: {per_role} cases for each of {', '.join(args.roles)}; seed {seed}", flush=True)
    total, failed = Stats(), []
    started = time.monotonic()
    for role in args.roles:
        stats = Stats()
        began = time.monotonic()
        try:
            # Chunks of at most CHUNK cases, each from its own seed derived
            # from ``seed``: hypothesis keeps a tree of every case it ran,
            # which grows (and slows) without bound over one long run.
            for chunk, start in enumerate(range(0, per_role, CHUNK)):
                fuzz(role, seed + chunk * 1_000_003, min(CHUNK, per_role - start), stats)
        except Exception as exc:  # report, then go on with the other roles
            failed.append(role)
            print(f"FAILED {role}: {exc}", flush=True)
        elapsed = time.monotonic() - began
        total.add(stats)
        print(f"{role:11} {stats.cases:7} cases {elapsed:7.1f} s ({stats.cases / max(elapsed, 1e-9):6.0f}/s) "
              f"authenticated {stats.authenticated:6} bidi {stats.bidi:5} stream-error {stats.stream_error:6} "
              f"clean-close {stats.clean_close:6} open-until-tcp-close {stats.open_until_tcp_close:5} "
              f"bytes {stats.bytes_fed}", flush=True)
    elapsed = time.monotonic() - started
    top = sorted(total.conditions.items(), key=lambda kv: -kv[1])[:12]
    print(f"total       {total.cases:7} cases {elapsed:7.1f} s; failures: {', '.join(failed) or 'none'}; seed {seed}")
    print("stream errors we sent: " + ", ".join(f"{k} {v}" for k, v in top))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
