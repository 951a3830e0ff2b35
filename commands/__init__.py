"""ucloud.commands: command handlers (load, decide, append with optimistic concurrency)."""
