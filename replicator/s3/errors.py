"""S3 errors: a code clients map, a message, an HTTP status, rendered as the S3 XML error document."""

from __future__ import annotations

from xml.sax.saxutils import escape


class S3Error(Exception):
    """An S3 error answer. Raising one promises that nothing was changed (or only garbage the store frees)."""

    def __init__(
        self, code: str, message: str, status: int, *, resource: str = "", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.resource = resource
        self.headers = headers or {}

    def xml(self, request_id: str) -> bytes:
        resource = f"<Resource>{escape(self.resource)}</Resource>" if self.resource else ""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(self.code)}</Code><Message>{escape(self.message)}</Message>"
            f"{resource}<RequestId>{request_id}</RequestId></Error>"
        ).encode()


def access_denied(message: str = "Access Denied") -> S3Error:
    return S3Error("AccessDenied", message, 403)


def invalid_argument(message: str) -> S3Error:
    return S3Error("InvalidArgument", message, 400)


def invalid_request(message: str) -> S3Error:
    return S3Error("InvalidRequest", message, 400)


def not_implemented(what: str) -> S3Error:
    return S3Error("NotImplemented", f"{what} is not implemented by this server", 501)
