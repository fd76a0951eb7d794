"""The federation policy table."""

from twisted.trial import unittest

from fedgate.policy import PeerPolicy, PolicyTable


class PolicyTests(unittest.TestCase):
    def test_open_mode(self):
        table = PolicyTable(PeerPolicy(encryption="optional"), {"bad.example": PeerPolicy("bad.example", allowed=False)})
        self.assertFalse(table.is_blocked("any.example"))
        self.assertTrue(table.is_blocked("bad.example"))
        self.assertEqual(table.for_peer("any.example").encryption, "optional")
        self.assertEqual(table.for_peer("any.example").domain, "any.example")
        self.assertIn("blocked", table.why_blocked("bad.example"))

    def test_allowlist_mode(self):
        table = PolicyTable(PeerPolicy(), {"ok.example": PeerPolicy("ok.example")}, "allowlist")
        self.assertFalse(table.is_blocked("ok.example"))
        self.assertTrue(table.is_blocked("other.example"))
        self.assertIn("allow-list", table.why_blocked("other.example"))

    def test_changes_are_announced_and_apply_at_once(self):
        table = PolicyTable()
        heard = []
        table.subscribe(heard.append)
        table.set_peer(PeerPolicy("p.example", allowed=False, addresses=(("127.0.0.1", 5999),)))
        self.assertTrue(table.is_blocked("p.example"))
        self.assertEqual(table.static_addresses("P.Example."), (("127.0.0.1", 5999),))
        self.assertTrue(table.remove_peer("p.example"))
        self.assertFalse(table.remove_peer("p.example"))
        table.set_default(PeerPolicy(authentication="certificate"), mode="allowlist")
        self.assertEqual(heard, ["p.example", "p.example", None])
        self.assertTrue(table.for_peer("x.example").requires_certificate)
        self.assertRaises(ValueError, table.set_default, PeerPolicy(), "closed")

    def test_default_for_a_peer_is_the_default_naming_it(self):
        """for_peer copies the default's terms without dataclasses.replace:
        the copy is the same value, frozen, hashable, and follows a new
        default at once."""
        from dataclasses import FrozenInstanceError, replace
        default = PeerPolicy(encryption="optional", authentication="certificate", addresses=(("h", 1),),
                             max_stanza_bytes=1000, rate_limit=3.0, note="n")
        table = PolicyTable(default)
        got = table.for_peer("any.example")
        self.assertEqual(got, replace(default, domain="any.example"))
        self.assertEqual(hash(got), hash(replace(default, domain="any.example")))
        self.assertIs(type(got), PeerPolicy)
        self.assertIsNone(table.default.domain, "the default itself is left alone")
        self.assertRaises(FrozenInstanceError, setattr, got, "encryption", "required")
        self.assertTrue(got.requires_certificate)
        table.set_default(PeerPolicy(encryption="required"))
        self.assertEqual(table.for_peer("any.example"), PeerPolicy("any.example", encryption="required"))

    def test_rate_limit_lookup(self):
        table = PolicyTable(PeerPolicy(rate_limit=50.0), {"p.example": PeerPolicy("p.example", rate_limit=5.0)})
        self.assertEqual(table.rate_limit("p.example"), 5.0)
        self.assertEqual(table.rate_limit("other.example"), 50.0)

    def test_bad_values(self):
        self.assertRaises(ValueError, PeerPolicy, encryption="maybe")
        self.assertRaises(ValueError, PeerPolicy, authentication="password")
