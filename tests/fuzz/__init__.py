"""Fuzzing fedgate's streams: a grammar of XMPP S2S and component streams
rendered to bytes, byte-level mutation and random segmentation
(:mod:`tests.fuzz.grammar`), the real role handlers driven in memory with
an oracle per case (:mod:`tests.fuzz.roles`, :mod:`tests.fuzz.run`), and
a client that does the same over loopback against ``twistd fedgate``
(:mod:`tests.fuzz.loopback`).

CI runs a short pass (tests/test_fuzz.py); the long run is ``scripts/fuzz``.
"""
