"""ucloud.gateway: the HTTP API, authentication and the metadata server."""
