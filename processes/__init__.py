"""ucloud.processes: process managers (scheduler, migrator, IPAM, billing, failure detector)."""
