"""ucloud.domain: aggregates, events, commands and value types.

Pure: imports nothing of ucloud outside itself and performs no I/O.
"""
