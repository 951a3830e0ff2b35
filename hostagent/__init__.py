"""ucloud.hostagent: the per-host daemon reconciling QEMU and networks with the log."""
