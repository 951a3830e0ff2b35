"""Authentication and rights, apart from HTTP: user directories (LDAP, built-in),
TOTP seeds and verification, the used-token cache, realms and rights, signed
sessions, failure rate limits, the secret stores and private files.

The gateway (its auth middleware and routes) and the CLI (credentials, ``ucloud up``)
both build on this package; it imports nothing of either. See docs/auth.md.
"""
