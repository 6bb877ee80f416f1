"""Sans-IO codec for the PostgreSQL frontend/backend protocol 3.0: builds and parses messages as bytes."""

import struct

# Startup-phase request codes (the int32 after the length of an untyped packet).
PROTOCOL_3_0 = 3 << 16
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104

# PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
MAX_STARTUP_PACKET_LENGTH = 10000

# Authentication request codes carried by an 'R' message.
AUTH_OK = 0
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# Transaction status byte of ReadyForQuery.
TRANS_IDLE = ord("I")
TRANS_INBLOCK = ord("T")
TRANS_FAILED = ord("E")

# Message type bytes, named as in the protocol chapter.  Backend messages:
AUTHENTICATION = ord("R")
BACKEND_KEY_DATA = ord("K")
PARAMETER_STATUS = ord("S")
READY_FOR_QUERY = ord("Z")
ERROR_RESPONSE = ord("E")
NOTICE_RESPONSE = ord("N")
NOTIFICATION_RESPONSE = ord("A")
COMMAND_COMPLETE = ord("C")
COPY_IN_RESPONSE = ord("G")
COPY_OUT_RESPONSE = ord("H")
COPY_BOTH_RESPONSE = ord("W")
NEGOTIATE_PROTOCOL_VERSION = ord("v")
# Frontend messages:
QUERY = ord("Q")
PARSE = ord("P")
BIND = ord("B")
DESCRIBE = ord("D")
EXECUTE = ord("E")
CLOSE = ord("C")
SYNC = ord("S")
FLUSH = ord("H")
FUNCTION_CALL = ord("F")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")
TERMINATE = ord("X")
PASSWORD_MESSAGE = ord("p")  # also SASLInitialResponse and SASLResponse

_int32 = struct.Struct("!i")
_uint32 = struct.Struct("!I")
_header = struct.Struct("!cI")
_two_int32 = struct.Struct("!ii")


def message(msg_type: bytes, payload: bytes = b"") -> bytes:
    """One typed message: type byte, int32 length (self-inclusive), payload."""
    return _header.pack(msg_type, len(payload) + 4) + payload


def cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def read_cstring(data: bytes, pos: int) -> tuple[str, int]:
    """The NUL-terminated string at pos and the position after its terminator."""
    end = data.index(b"\0", pos)
    return data[pos:end].decode("utf-8", "replace"), end + 1


# ---------------------------------------------------------------- startup phase

def startup_message(params: dict[str, str]) -> bytes:
    body = _int32.pack(PROTOCOL_3_0)
    body += b"".join(cstring(k) + cstring(v) for k, v in params.items()) + b"\0"
    return _int32.pack(len(body) + 4) + body


def cancel_request(pid: int, key: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, pid, key)


def parse_startup_params(body: bytes) -> dict[str, str]:
    """Name/value pairs of a StartupMessage body (after length and version)."""
    params: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        name, pos = read_cstring(body, pos)
        value, pos = read_cstring(body, pos)
        params[name] = value
    if pos >= len(body):
        raise ValueError("startup packet is not terminated")
    return params


def negotiate_protocol_version(newest_minor: int, unsupported: list[str]) -> bytes:
    payload = _two_int32.pack(newest_minor, len(unsupported))
    payload += b"".join(cstring(name) for name in unsupported)
    return message(b"v", payload)


# ---------------------------------------------------------------- backend messages

def authentication(code: int, data: bytes = b"") -> bytes:
    return message(b"R", _int32.pack(code) + data)


AUTHENTICATION_OK = authentication(AUTH_OK)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstring(name) + cstring(value))


def backend_key_data(pid: int, key: int) -> bytes:
    return message(b"K", _two_int32.pack(pid, key))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def _fields(severity: str, sqlstate: str, text: str, detail: str | None, hint: str | None) -> bytes:
    # 'S' localized severity, 'V' non-localized severity, 'C' code, 'M' message.
    out = b"S" + cstring(severity) + b"V" + cstring(severity) + b"C" + cstring(sqlstate)
    out += b"M" + cstring(text)
    if detail:
        out += b"D" + cstring(detail)
    if hint:
        out += b"H" + cstring(hint)
    return out + b"\0"


def error_response(severity: str, sqlstate: str, text: str,
                   detail: str | None = None, hint: str | None = None, kind: bytes = b"E") -> bytes:
    """An ErrorResponse, or with kind b"N" a NoticeResponse (the same fields)."""
    return message(kind, _fields(severity, sqlstate, text, detail, hint))


def parse_error_fields(payload: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse keyed by their one-letter code."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0:
        code = chr(payload[pos])
        value, pos = read_cstring(payload, pos + 1)
        fields[code] = value
    return fields


# ---------------------------------------------------------------- frontend messages

def query(sql: str) -> bytes:
    return message(b"Q", cstring(sql))


SYNC_MESSAGE = message(b"S")


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstring(mechanism) + _int32.pack(len(data)) + data)


def quote_literal(value: str) -> str:
    """An SQL string literal for value, as PostgreSQL's quote_literal() writes it."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# ---------------------------------------------------------------- framing

class MessageReader:
    """Accumulates bytes from a stream and yields whole typed messages.

    Used outside the hot path (startup, authentication, server login); the
    pooled backend's event loop frames its streams inline for speed.
    """

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self, max_length: int = 1 << 30) -> tuple[int, bytes] | None:
        """(type byte, payload) of the next whole message, or None if incomplete."""
        buf = self.buf
        if len(buf) < 5:
            return None
        length = _uint32.unpack_from(buf, 1)[0]
        if length < 4 or length > max_length:
            raise ValueError(f"invalid message length {length}")
        if len(buf) < length + 1:
            return None
        msg_type = buf[0]
        payload = bytes(buf[5:length + 1])
        del buf[:length + 1]
        return msg_type, payload
