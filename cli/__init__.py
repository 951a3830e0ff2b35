"""ucloud.cli: the console entry points (ucloud, ucloud-audit)."""
