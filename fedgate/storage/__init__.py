"""Persistent state: the storage interface and its backends (see interface.py)."""

from fedgate.storage.interface import ComponentCredential, Storage, StorageError

__all__ = ["ComponentCredential", "Storage", "StorageError"]
