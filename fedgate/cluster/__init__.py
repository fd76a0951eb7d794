"""Several fedgate nodes as one gateway, sharing state through Redis.

:mod:`fedgate.cluster.redisclient` is the Redis client (redis-py on
threads); the shared store is :mod:`fedgate.storage.redis`.
"""
