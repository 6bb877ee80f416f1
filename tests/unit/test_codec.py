"""The wire codec on bytes: framing, startup packets, errors, quoting."""

import struct

import pytest

from pgforkpool.shared import protocol
from pgforkpool.shared.errors import PgError


def test_message_framing_and_reader_split_across_feeds():
    data = protocol.query("SELECT 1") + protocol.SYNC_MESSAGE
    reader = protocol.MessageReader()
    reader.feed(data[:3])
    assert reader.next() is None
    reader.feed(data[3:])
    assert reader.next() == (protocol.QUERY, b"SELECT 1\0")
    assert reader.next() == (protocol.SYNC, b"")
    assert reader.next() is None


def test_reader_rejects_a_bad_length():
    reader = protocol.MessageReader()
    reader.feed(b"Q" + struct.pack("!I", 2))
    with pytest.raises(ValueError):
        reader.next()


def test_startup_message_round_trip():
    packet = protocol.startup_message({"user": "alice", "database": "app", "options": "-c a=b"})
    length, code = struct.unpack_from("!ii", packet)
    assert length == len(packet)
    assert code == protocol.PROTOCOL_3_0
    assert protocol.parse_startup_params(packet[8:]) == {
        "user": "alice", "database": "app", "options": "-c a=b"}


def test_unterminated_startup_packet_is_an_error():
    with pytest.raises(ValueError):
        protocol.parse_startup_params(b"user\0alice\0")


def test_cancel_request_layout():
    assert protocol.cancel_request(42, 7) == struct.pack("!iiii", 16, protocol.CANCEL_REQUEST_CODE, 42, 7)


def test_error_response_fields_round_trip():
    packet = PgError("invalid_password", 'password authentication failed for user "app"').packet()
    assert packet[0:1] == b"E"
    assert struct.unpack_from("!I", packet, 1)[0] == len(packet) - 1
    fields = protocol.parse_error_fields(packet[5:])
    assert fields == {"S": "FATAL", "V": "FATAL", "C": "28P01",
                      "M": 'password authentication failed for user "app"'}
    again = PgError.from_fields(fields)
    assert (again.sqlstate, again.text, again.severity) == ("28P01", fields["M"], "FATAL")


def test_negotiate_protocol_version():
    """The newest version as a whole number (3.0), as PostgreSQL sends it: libpq 18 refuses 0."""
    msg = protocol.negotiate_protocol_version(["_pq_.x"])
    assert msg[0:1] == b"v"
    assert msg[5:] == struct.pack("!ii", 3 << 16, 1) + b"_pq_.x\0"


@pytest.mark.parametrize("value,literal", [
    ("plain", "'plain'"), ("it's", "'it''s'"), ("back\\slash", "E'back\\\\slash'"),
    # beyond ASCII: Unicode escapes, so that the text means the same in every client encoding
    ("né", "E'n\\u00e9'"), ("l'été\\", "E'l''\\u00e9t\\u00e9\\\\'"), ("😀", "E'\\U0001f600'"),
])
def test_quote_literal(value, literal):
    assert protocol.quote_literal(value) == literal


def test_quote_ident():
    assert protocol.quote_ident('a"b') == '"a""b"'


@pytest.mark.parametrize("encoding, codec", [
    ("UTF8", "utf-8"), ("LATIN1", "latin-1"), ("latin1", "latin-1"), ("WIN1252", "cp1252"),
    ("EUC_JP", "euc_jp"), ("MULE_INTERNAL", "utf-8"), (None, "utf-8"),
])
def test_python_codec_of_a_client_encoding(encoding, codec):
    assert protocol.python_codec(encoding) == codec
    "é".encode(protocol.python_codec(encoding), "replace")   # a codec Python has
