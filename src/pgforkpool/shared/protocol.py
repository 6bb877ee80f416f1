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


def negotiate_protocol_version(unsupported: list[str], newest: int = PROTOCOL_3_0) -> bytes:
    """NegotiateProtocolVersion: the newest version the server speaks, as a whole version
    number (3.0 is 196608, as PostgreSQL sends PG_PROTOCOL_LATEST: libpq 18 takes 0 for a
    version before 3.0 and refuses it), and the startup options it does not know."""
    payload = _two_int32.pack(newest, len(unsupported))
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
    """An SQL string literal for value, as PostgreSQL's quote_literal() writes it, in ASCII.

    A character beyond ASCII is written as a Unicode escape (E'\\u00e9'): the text of
    a hidden query is then the same in every client encoding, whichever session left
    its encoding on the server connection (PostgreSQL 13 and later accept such escapes
    in any server encoding that has the character).
    """
    quoted = value.replace("'", "''")
    if value.isascii() and "\\" not in value:
        return "'" + quoted + "'"
    quoted = quoted.replace("\\", "\\\\")
    if not value.isascii():
        quoted = "".join(c if c.isascii() else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
                         for c in quoted)
    return "E'" + quoted + "'"


# PostgreSQL's client encodings and Python's codecs for them (to read what a hidden query
# returns in the encoding the server connection has now); the rest are read as UTF-8.
_CODECS = {
    "UTF8": "utf-8", "SQL_ASCII": "utf-8", "LATIN1": "latin-1", "LATIN2": "iso8859-2",
    "LATIN3": "iso8859-3", "LATIN4": "iso8859-4", "LATIN5": "iso8859-9", "LATIN6": "iso8859-10",
    "LATIN7": "iso8859-13", "LATIN8": "iso8859-14", "LATIN9": "iso8859-15", "LATIN10": "iso8859-16",
    "ISO_8859_5": "iso8859-5", "ISO_8859_6": "iso8859-6", "ISO_8859_7": "iso8859-7",
    "ISO_8859_8": "iso8859-8", "WIN866": "cp866", "WIN874": "cp874", "WIN1250": "cp1250",
    "WIN1251": "cp1251", "WIN1252": "cp1252", "WIN1253": "cp1253", "WIN1254": "cp1254",
    "WIN1255": "cp1255", "WIN1256": "cp1256", "WIN1257": "cp1257", "WIN1258": "cp1258",
    "KOI8R": "koi8-r", "KOI8U": "koi8-u", "EUC_JP": "euc_jp", "EUC_KR": "euc_kr",
    "EUC_CN": "gb2312", "EUC_JIS_2004": "euc_jis_2004", "SJIS": "shift_jis",
    "SHIFT_JIS_2004": "shift_jis_2004", "BIG5": "big5", "GBK": "gbk", "GB18030": "gb18030",
    "UHC": "cp949", "JOHAB": "johab",
}


def python_codec(client_encoding: str | None) -> str:
    """The Python codec for a PostgreSQL client_encoding (as ParameterStatus reports it)."""
    if not client_encoding:
        return "utf-8"
    return _CODECS.get(client_encoding.upper().replace("-", "_"), "utf-8")


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
