"""ucloud.projections: read models built from the log."""
