"""The one exception every authenticator raises when it cannot say who is calling.

It lives here, not in the gateway, so that the authenticators in this package and the
gateway's development ``HeaderAuthenticator`` share it while the arrows point one way
(gateway -> auth). The gateway answers it with 401.
"""

from __future__ import annotations


class AuthenticationFailed(Exception):
    """The request does not say (credibly) who sends it: answered with 401.

    ``challenge`` becomes the WWW-Authenticate header, which a 401 must carry."""

    def __init__(self, message: str, challenge: str = 'Ucloud realm="ucloud"') -> None:
        super().__init__(message)
        self.challenge = challenge
