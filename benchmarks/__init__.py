"""Load generator for fedgate: a fake remote XMPP server and a component
against a real gateway, with figures reported as ratios to a raw echo relay.

See ``benchmarks/README.md``; run with ``python -m benchmarks.run``.
"""
