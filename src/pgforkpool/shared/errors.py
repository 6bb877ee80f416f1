"""The SQLSTATE codes pgforkpool reports, and the error type that carries one to a client."""

from . import protocol

# One table of every SQLSTATE the pooler itself raises (PostgreSQL's errcodes.txt names).
SQLSTATE = {
    "protocol_violation": "08P01",
    "connection_failure": "08006",
    "connection_exception": "08000",
    "sqlclient_unable_to_establish_sqlconnection": "08001",
    "invalid_authorization_specification": "28000",
    "invalid_password": "28P01",
    "invalid_catalog_name": "3D000",
    "too_many_connections": "53300",
    "insufficient_privilege": "42501",
    "feature_not_supported": "0A000",
    "admin_shutdown": "57P01",
    "cannot_connect_now": "57P03",
    "query_canceled": "57014",
    "invalid_parameter_value": "22023",
    "internal_error": "XX000",
}


class PgError(Exception):
    """An error to be sent to one client as an ErrorResponse."""

    def __init__(self, condition: str, text: str, *, severity: str = "FATAL",
                 detail: str | None = None, hint: str | None = None):
        super().__init__(text)
        self.sqlstate = SQLSTATE.get(condition, condition)
        self.text = text
        self.severity = severity
        self.detail = detail
        self.hint = hint

    def packet(self) -> bytes:
        return protocol.error_response(self.severity, self.sqlstate, self.text,
                                       self.detail, self.hint)

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> "PgError":
        """An error as the upstream server reported it (its ErrorResponse fields)."""
        return cls(fields.get("C", "XX000"), fields.get("M", "unknown error"),
                   severity=fields.get("V", fields.get("S", "FATAL")),
                   detail=fields.get("D"), hint=fields.get("H"))
