"""ucloud.cli: the console entry points (ucloud and its daemons: up, gateway, processes, metadata; ucloud-audit)."""
