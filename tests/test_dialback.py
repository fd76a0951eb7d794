"""XEP-0185 dialback keys, pinned by the XEP's own test vector."""

from twisted.trial import unittest

from fedgate.s2s.dialback import dialback_key, key_matches

VECTOR = "37c69b1cf07a3f67c04a5ef5902fa5114f2c76fe4a2686482ba5b89323075643"


class KeyTests(unittest.TestCase):
    def test_xep_0185_vector(self):
        self.assertEqual(dialback_key("s3cr3tf0rd14lb4ck", "xmpp.example.com", "example.org", "D60000229F"),
                         VECTOR)

    def test_matches_vector_with_whitespace(self):
        self.assertTrue(key_matches("s3cr3tf0rd14lb4ck", "xmpp.example.com", "example.org",
                                    "D60000229F", f"\n    {VECTOR}\n"))

    def test_every_input_matters(self):
        base = ("s3cr3tf0rd14lb4ck", "xmpp.example.com", "example.org", "D60000229F")
        for i, changed in enumerate(["other", "xmpp.example.net", "example.net", "D60000229G"]):
            args = list(base)
            args[i] = changed
            self.assertFalse(key_matches(*args, VECTOR), args)

    def test_garbage_keys(self):
        for key in ["", "zz", VECTOR[:-1], VECTOR.upper() + "0", "é" * 64]:
            self.assertFalse(key_matches("s3cr3tf0rd14lb4ck", "xmpp.example.com", "example.org",
                                         "D60000229F", key))
