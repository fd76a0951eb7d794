"""Several fedgate nodes as one gateway, sharing state through Redis.

:mod:`fedgate.cluster.redisclient` is the Redis client (redis-py on
threads); the shared store is :mod:`fedgate.storage.redis`, and
:mod:`~fedgate.cluster.sync` applies other nodes' admin writes here.
Routing across nodes: :mod:`~fedgate.cluster.membership` (leases, the
ownership table and its cache), :mod:`~fedgate.cluster.relay` (stanzas to
and from other nodes, acknowledged) and :mod:`~fedgate.cluster.inflight`
(what waits for an acknowledgement).
"""
