"""ucloud.eventstore: the log. One async interface, three backends (memory, SQLite, etcd).

Shared infrastructure: imports nothing else of ucloud, so every layer may depend on it.
"""
