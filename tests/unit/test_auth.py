"""Unit tests of shared/auth.py: ServerAuth and ClientAuth run against each other through bytes, the auth_file, verifiers."""

import base64
import hashlib
import hmac
import re
import struct

import pytest

from pgforkpool.shared import auth, protocol
from pgforkpool.shared.auth import AuthFailed, AuthFileError, ClientAuth, ServerAuth
from pgforkpool.shared.errors import PgError

USER = "alice"
PASSWORD = "correct horse"
METHODS = ("password", "md5", "scram-sha-256")
KINDS = ("plain", "md5", "scram")
FAILED = f'password authentication failed for user "{USER}"'

R = protocol  # the authentication request codes, short
SCRAM_CODES = [R.AUTH_SASL, R.AUTH_SASL_CONTINUE, R.AUTH_SASL_FINAL]

# What PostgreSQL 15.18 stored for CREATE ROLE s_user / m_user ... PASSWORD 'pencil'
# (SELECT rolpassword FROM pg_authid), with password_encryption scram-sha-256 and md5.
PG_SCRAM_PENCIL = ("SCRAM-SHA-256$4096:6MhzY8eXFyOQuV7OQCu19g==$wAXFHZyGFcTPOMCXXxcP7132Qf5tYJS7eCXsmTcen7k="
                   ":q78MGp2bnBatXV8/1Tnsw0PNzwynJNBCvNffvv7RPG4=")
PG_MD5_PENCIL_M_USER = "md501280f2bb5b3b86b333b3101c150024a"


def stored_secret(kind: str, password: str = PASSWORD, user: str = USER) -> str:
    if kind == "plain":
        return password
    if kind == "md5":
        return auth.md5_secret(password, user)
    return auth.scram_verifier(password)


# ---------------------------------------------------------------- driving an exchange through bytes

def one_message(data: bytes) -> tuple[int, bytes]:
    reader = protocol.MessageReader()
    reader.feed(data)
    msg = reader.next()
    assert msg is not None and not reader.buf, "expected exactly one whole message"
    return msg


def auth_request(data: bytes) -> tuple[int, bytes]:
    """(code, data) of one 'R' message as ServerAuth emits it."""
    msg_type, payload = one_message(data)
    assert msg_type == protocol.AUTHENTICATION
    return struct.unpack_from("!i", payload)[0], payload[4:]


def p_payload(data: bytes) -> bytes:
    """Payload of one 'p' message as ClientAuth emits it."""
    msg_type, payload = one_message(data)
    assert msg_type == protocol.PASSWORD_MESSAGE
    return payload


def run_exchange(server: ServerAuth, client: ClientAuth, codes: list[int] | None = None) -> list[int]:
    """Plays server against client until one is done or raises; returns the request codes seen."""
    codes = [] if codes is None else codes
    outgoing = server.start()
    while outgoing:
        code, data = auth_request(outgoing)
        codes.append(code)
        reply = client.respond(code, data)
        if not reply:  # AuthenticationSASLFinal verified
            break
        outgoing = server.feed(p_payload(reply))
    assert server.done and server.state is auth.ServerState.AUTHENTICATED
    assert client.respond(R.AUTH_OK, b"") == b""
    return codes


def expect_failure(server: ServerAuth, client: ClientAuth) -> tuple[AuthFailed, list[int]]:
    codes: list[int] = []
    with pytest.raises(AuthFailed) as info:
        run_exchange(server, client, codes)
    assert not server.done and server.state is auth.ServerState.FAILED
    assert info.value.error.severity == "FATAL"
    return info.value, codes


def sasl_initial(data: bytes, mechanism: str = "SCRAM-SHA-256") -> bytes:
    return p_payload(protocol.sasl_initial_response(mechanism, data))


# ---------------------------------------------------------------- an independent RFC 5802 computation

def rfc5802_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """ClientKey, StoredKey, ServerKey of an ASCII password (SASLprep leaves it as is)."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    return client_key, hashlib.sha256(client_key).digest(), server_key


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class HandRolledScramClient:
    """A SCRAM-SHA-256 client written from RFC 5802, to send what ClientAuth would not."""

    def __init__(self, password: str, gs2_header: str = "n,,", sasl_user: str = "", nonce: str = "fyko+d2lbbFgONRv9qkxdawL"):
        self.password, self.gs2_header = password, gs2_header
        self.bare = f"n={sasl_user},r={nonce}"
        self.nonce = nonce

    def client_first(self) -> bytes:
        return (self.gs2_header + self.bare).encode()

    def client_final(self, server_first: bytes, nonce: str | None = None) -> bytes:
        attrs = dict(attr.split("=", 1) for attr in server_first.decode().split(","))
        assert attrs["r"].startswith(self.nonce) and len(attrs["r"]) > len(self.nonce)
        client_key, stored_key, server_key = rfc5802_keys(self.password, base64.b64decode(attrs["s"]), int(attrs["i"]))
        without_proof = f"c={b64(self.gs2_header.encode())},r={nonce or attrs['r']}"
        auth_message = f"{self.bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, "sha256").digest()
        self.server_signature = hmac.new(server_key, auth_message, "sha256").digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        return f"{without_proof},p={b64(proof)}".encode()


def test_hand_rolled_client_matches_rfc7677_example():
    # RFC 7677 section 3: user "user", password "pencil".
    client = HandRolledScramClient("pencil", sasl_user="user", nonce="rOprNGfwEbeRWgbNEkqO")
    server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    assert client.client_final(server_first) == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                                                 b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    assert b64(client.server_signature) == "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def scram_server_first(server: ServerAuth, client: HandRolledScramClient) -> bytes:
    code, _ = auth_request(server.start())
    assert code == R.AUTH_SASL
    code, server_first = auth_request(server.feed(sasl_initial(client.client_first())))
    assert code == R.AUTH_SASL_CONTINUE
    return server_first


# ---------------------------------------------------------------- every method x every stored secret

SUCCESS = {
    ("password", "plain"): [R.AUTH_CLEARTEXT_PASSWORD],
    ("password", "md5"): [R.AUTH_CLEARTEXT_PASSWORD],
    ("password", "scram"): [R.AUTH_CLEARTEXT_PASSWORD],
    ("md5", "plain"): [R.AUTH_MD5_PASSWORD],
    ("md5", "md5"): [R.AUTH_MD5_PASSWORD],
    ("md5", "scram"): SCRAM_CODES,  # PostgreSQL switches to SCRAM for a SCRAM verifier
    ("scram-sha-256", "plain"): SCRAM_CODES,
    ("scram-sha-256", "scram"): SCRAM_CODES,
}


@pytest.mark.parametrize(("method", "kind"), sorted(SUCCESS))
def test_right_password_succeeds(method, kind):
    server = ServerAuth(method, USER, stored_secret(kind))
    assert run_exchange(server, ClientAuth(USER, PASSWORD)) == SUCCESS[method, kind]


@pytest.mark.parametrize("kind", KINDS)
def test_trust_needs_no_exchange(kind):
    server = ServerAuth("trust", USER, stored_secret(kind))
    assert server.start() == b"" and server.done
    assert ServerAuth("trust", "nobody", None).start() == b""


@pytest.mark.parametrize(("method", "kind"), sorted(SUCCESS))
def test_wrong_password_fails(method, kind):
    failure, codes = expect_failure(ServerAuth(method, USER, stored_secret(kind)), ClientAuth(USER, "wrong horse"))
    assert (failure.error.sqlstate, failure.error.text) == ("28P01", FAILED)
    assert codes == SUCCESS[method, kind][:2]  # a SCRAM exchange fails on the client-final-message
    assert failure.log_detail == f'Password does not match for user "{USER}".'


def test_scram_method_cannot_use_md5_secret():
    failure, codes = expect_failure(ServerAuth("scram-sha-256", USER, stored_secret("md5")), ClientAuth(USER, PASSWORD))
    assert (failure.error.sqlstate, failure.error.text) == ("28P01", FAILED)
    assert codes == SCRAM_CODES[:2]  # the exchange goes through the motions first
    assert failure.log_detail == f'User "{USER}" does not have a valid SCRAM secret.'


@pytest.mark.parametrize(("method", "codes_seen"), [
    ("password", [R.AUTH_CLEARTEXT_PASSWORD]),
    ("md5", [R.AUTH_MD5_PASSWORD]),
    ("scram-sha-256", SCRAM_CODES[:2]),
])
def test_unknown_user_fails_like_a_wrong_password(method, codes_seen):
    failure, codes = expect_failure(ServerAuth(method, USER, None), ClientAuth(USER, PASSWORD))
    assert (failure.error.sqlstate, failure.error.text, failure.error.detail) == ("28P01", FAILED, None)
    assert codes == codes_seen
    assert failure.log_detail == f'User "{USER}" has no entry in auth_file.'


def test_unknown_user_gets_a_stable_mock_salt():
    def server_first(user: str, secret: str | None) -> dict[str, str]:
        text = scram_server_first(ServerAuth("scram-sha-256", user, secret), HandRolledScramClient("x")).decode()
        return dict(attr.split("=", 1) for attr in text.split(","))

    first, again, other = server_first("ghost", None), server_first("ghost", None), server_first("spook", None)
    assert first["s"] == again["s"] != other["s"]
    assert first["r"] != again["r"]
    assert first["i"] == "4096" and len(base64.b64decode(first["s"])) == 16  # as a real verifier's
    # A plain secret is served with the same kind of salt, so it does not stand out.
    assert server_first("ghost", "pw")["s"] == first["s"]


# ---------------------------------------------------------------- empty passwords

@pytest.mark.parametrize("method", ["password", "md5"])
@pytest.mark.parametrize("secret", [PASSWORD, None])
def test_empty_password_message_is_refused(method, secret):
    # PostgreSQL's recv_password_packet: FATAL 28P01 "empty password returned by client".
    server = ServerAuth(method, USER, secret)
    server.start()
    with pytest.raises(AuthFailed) as info:
        server.feed(b"\0")
    assert (info.value.error.sqlstate, info.value.error.text) == ("28P01", "empty password returned by client")
    assert info.value.error.severity == "FATAL" and server.state is auth.ServerState.FAILED


@pytest.mark.parametrize("kind", ["plain", "scram"])
def test_empty_password_over_scram_fails(kind):
    server = ServerAuth("scram-sha-256", USER, stored_secret(kind))
    client = HandRolledScramClient("")
    server_first = scram_server_first(server, client)
    with pytest.raises(AuthFailed) as info:
        server.feed(client.client_final(server_first))
    assert (info.value.error.sqlstate, info.value.error.text) == ("28P01", FAILED)


@pytest.mark.parametrize("code", [R.AUTH_CLEARTEXT_PASSWORD, R.AUTH_MD5_PASSWORD, R.AUTH_SASL])
@pytest.mark.parametrize("secret", ["", None])
def test_client_without_password_cannot_answer(code, secret):
    data = {R.AUTH_MD5_PASSWORD: b"salt", R.AUTH_SASL: b"SCRAM-SHA-256\0\0"}.get(code, b"")
    with pytest.raises(PgError) as info:
        ClientAuth(USER, secret).respond(code, data)
    assert (info.value.sqlstate, info.value.text) == ("08001", f'no password supplied for user "{USER}" in auth_file')


# ---------------------------------------------------------------- ClientAuth

@pytest.mark.parametrize("stored_kind", ["plain", "md5"])
def test_client_with_md5_hash_answers_md5_challenge(stored_kind):
    client = ClientAuth(USER, auth.md5_secret(PASSWORD, USER))
    assert run_exchange(ServerAuth("md5", USER, stored_secret(stored_kind)), client) == [R.AUTH_MD5_PASSWORD]


@pytest.mark.parametrize(("code", "method"), [(R.AUTH_SASL, "SCRAM-SHA-256"), (R.AUTH_CLEARTEXT_PASSWORD, "password")])
def test_client_with_md5_hash_cannot_answer_plain_or_scram(code, method):
    data = b"SCRAM-SHA-256\0\0" if code == R.AUTH_SASL else b""
    with pytest.raises(PgError) as info:
        ClientAuth(USER, auth.md5_secret(PASSWORD, USER)).respond(code, data)
    assert info.value.sqlstate == "08001"
    assert info.value.text == f'auth_file has only an MD5 hash for user "{USER}", but the server requested {method} authentication'


def test_client_md5_response_is_postgresql_formula():
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5((PASSWORD + USER).encode()).hexdigest()
    expected = b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"
    assert p_payload(ClientAuth(USER, PASSWORD).respond(R.AUTH_MD5_PASSWORD, salt)) == expected


def test_client_sends_libpq_style_client_first():
    payload = p_payload(ClientAuth(USER, PASSWORD).respond(R.AUTH_SASL, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"))
    mechanism, rest = payload.split(b"\0", 1)
    length = struct.unpack_from("!i", rest)[0]
    assert mechanism == b"SCRAM-SHA-256" and length == len(rest) - 4
    assert re.fullmatch(rb"n,,n=,r=[\x21-\x2b\x2d-\x7e]+", rest[4:])


def test_client_checks_server_signature():
    server, client = ServerAuth("scram-sha-256", USER, stored_secret("scram")), ClientAuth(USER, PASSWORD)
    _, data = auth_request(server.start())
    _, server_first = auth_request(server.feed(p_payload(client.respond(R.AUTH_SASL, data))))
    _, server_final = auth_request(server.feed(p_payload(client.respond(R.AUTH_SASL_CONTINUE, server_first))))
    forged = b"v=" + base64.b64encode(bytes(32))
    with pytest.raises(PgError) as info:
        client.respond(R.AUTH_SASL_FINAL, forged)
    assert (info.value.sqlstate, info.value.text) == ("08P01", "incorrect server signature")
    assert server_final != forged


def test_client_refuses_authentication_ok_before_scram_final():
    client = ClientAuth(USER, PASSWORD)
    client.respond(R.AUTH_SASL, b"SCRAM-SHA-256\0\0")
    with pytest.raises(PgError) as info:
        client.respond(R.AUTH_OK, b"")
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize(("code", "data"), [
    (7, b""),  # GSS
    (9, b""),  # SSPI
    (R.AUTH_SASL, b"SCRAM-SHA-256-PLUS\0\0"),
    (R.AUTH_SASL_CONTINUE, b"r=abc,s=c2FsdHNhbHRzYWx0,i=4096"),
    (R.AUTH_SASL_FINAL, b"v=AAAA"),
    (R.AUTH_MD5_PASSWORD, b"abc"),
])
def test_client_protocol_violations(code, data):
    with pytest.raises(PgError) as info:
        ClientAuth(USER, PASSWORD).respond(code, data)
    assert info.value.sqlstate == "08P01"


def test_client_refuses_a_server_first_with_a_foreign_nonce():
    client = ClientAuth(USER, PASSWORD)
    client.respond(R.AUTH_SASL, b"SCRAM-SHA-256\0\0")
    with pytest.raises(PgError) as info:
        client.respond(R.AUTH_SASL_CONTINUE, b"r=notours,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert (info.value.sqlstate, info.value.text) == ("08P01", "malformed SCRAM message from server")


def test_client_cleartext():
    assert p_payload(ClientAuth(USER, PASSWORD).respond(R.AUTH_CLEARTEXT_PASSWORD, b"")) == PASSWORD.encode() + b"\0"


# ---------------------------------------------------------------- ServerAuth details

def test_md5_challenge_has_fresh_random_salt():
    salts = {auth_request(ServerAuth("md5", USER, PASSWORD).start())[1] for _ in range(8)}
    assert len(salts) == 8 and all(len(salt) == 4 for salt in salts)


def test_md5_method_with_scram_verifier_offers_sasl():
    code, data = auth_request(ServerAuth("md5", USER, stored_secret("scram")).start())
    assert (code, data) == (R.AUTH_SASL, b"SCRAM-SHA-256\0\0")


@pytest.mark.parametrize("gs2_header", ["n,,", "y,,"])
@pytest.mark.parametrize("sasl_user", ["", "somebody-else", "a=2Cb"])
def test_server_accepts_channel_binding_flags_and_ignores_sasl_user(gs2_header, sasl_user):
    server = ServerAuth("scram-sha-256", USER, stored_secret("scram"))
    client = HandRolledScramClient(PASSWORD, gs2_header, sasl_user)
    code, server_final = auth_request(server.feed(client.client_final(scram_server_first(server, client))))
    assert code == R.AUTH_SASL_FINAL and server.done
    assert server_final == b"v=" + b64(client.server_signature).encode()


def test_server_without_initial_response_sends_empty_challenge():
    server = ServerAuth("scram-sha-256", USER, stored_secret("scram"))
    client = HandRolledScramClient(PASSWORD)
    server.start()
    assert auth_request(server.feed(b"SCRAM-SHA-256\0" + struct.pack("!i", -1))) == (R.AUTH_SASL_CONTINUE, b"")
    code, server_first = auth_request(server.feed(client.client_first()))
    assert code == R.AUTH_SASL_CONTINUE
    assert auth_request(server.feed(client.client_final(server_first)))[0] == R.AUTH_SASL_FINAL and server.done


def protocol_failure(server: ServerAuth, *payloads: bytes) -> PgError:
    server.start()
    with pytest.raises(AuthFailed) as info:
        for payload in payloads:
            server.feed(payload)
    assert info.value.error.severity == "FATAL" and server.state is auth.ServerState.FAILED
    return info.value.error


@pytest.mark.parametrize(("payload", "sqlstate", "text", "detail"), [
    (sasl_initial(b"n,,n=,r=abc", "SCRAM-SHA-1"), "08P01",
     "client selected an invalid SASL authentication mechanism", None),
    (sasl_initial(b"n,,n=,r=abc", "SCRAM-SHA-256-PLUS"), "08P01",
     "client selected an invalid SASL authentication mechanism", None),
    (sasl_initial(b"garbage"), "08P01", "malformed SCRAM message", "Unexpected channel-binding flag \"'g'\"."),
    (sasl_initial(b"p=tls-server-end-point,,n=,r=abc"), "08P01", "malformed SCRAM message",
     "The client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data."),
    (sasl_initial(b""), "08P01", "malformed SCRAM message", "The message is empty."),
    (sasl_initial(b"n,,n=,r=a\0b"), "08P01", "malformed SCRAM message", "Message length does not match input length."),
    (sasl_initial(b"n,,r=abc"), "08P01", "malformed SCRAM message", "Expected attribute \"n\" but found \"'r'\"."),
    (sasl_initial(b"n,,n="), "08P01", "malformed SCRAM message", 'Expected attribute "r" but found "0x00".'),
    (sasl_initial(b"n"), "08P01", "malformed SCRAM message", 'Comma expected, but found character "0x00".'),
    (sasl_initial(b"n,a=bob,n=,r=abc"), "0A000", "client uses authorization identity, but it is not supported", None),
    (sasl_initial(b"n,,m=ext,n=,r=abc"), "0A000", "client requires an unsupported SCRAM extension", None),
    (sasl_initial(b"n,,n=,r=abc") + b"x", "08P01", "invalid message format", None),
    (b"SCRAM-SHA-256\0\0\0", "08P01", "insufficient data left in message", None),
    (b"SCRAM-SHA-256", "08P01", "invalid string in message", None),
])
def test_server_refuses_malformed_sasl_initial_response(payload, sqlstate, text, detail):
    error = protocol_failure(ServerAuth("scram-sha-256", USER, stored_secret("scram")), payload)
    assert (error.sqlstate, error.text, error.detail) == (sqlstate, text, detail)


@pytest.mark.parametrize(("final", "text", "detail"), [
    (lambda nonce, proof: "garbage", "malformed SCRAM message", "Expected attribute \"c\" but found \"'g'\"."),
    (lambda nonce, proof: f"c=eSws,r={nonce},p={proof}",
     "unexpected SCRAM channel-binding attribute in client-final-message", None),
    (lambda nonce, proof: f"c=biws,r={nonce},p=AAAA", "malformed SCRAM message", "Malformed proof in client-final-message."),
    (lambda nonce, proof: f"c=biws,r={nonce}", "malformed SCRAM message", "Attribute expected, but found end of string."),
    (lambda nonce, proof: f"c=biws,r={nonce},p={proof},x=1", "malformed SCRAM message",
     "Garbage found at the end of client-final-message."),
    (lambda nonce, proof: f"c=biws,r={nonce}x,p={proof}", "invalid SCRAM response", "Nonce does not match."),
])
def test_server_refuses_malformed_client_final(final, text, detail):
    server = ServerAuth("scram-sha-256", USER, stored_secret("scram"))
    client = HandRolledScramClient(PASSWORD)
    nonce = dict(attr.split("=", 1) for attr in scram_server_first(server, client).decode().split(","))["r"]
    with pytest.raises(AuthFailed) as info:
        server.feed(final(nonce, b64(bytes(32))).encode())
    assert (info.value.error.sqlstate, info.value.error.text, info.value.error.detail) == ("08P01", text, detail)


@pytest.mark.parametrize("payload", [b"abc", b"a\0b\0"])
def test_server_refuses_bad_password_packet(payload):
    error = protocol_failure(ServerAuth("password", USER, PASSWORD), payload)
    assert (error.sqlstate, error.text) == ("08P01", "invalid password packet size")


def test_server_refuses_messages_out_of_turn():
    server = ServerAuth("password", USER, PASSWORD)
    server.start()
    server.feed(PASSWORD.encode() + b"\0")
    with pytest.raises(AuthFailed) as info:
        server.feed(PASSWORD.encode() + b"\0")
    assert info.value.error.sqlstate == "08P01"
    trust = ServerAuth("trust", USER, None)
    trust.start()
    with pytest.raises(AuthFailed):
        trust.feed(b"x\0")


def test_server_refuses_unknown_method():
    with pytest.raises(ValueError):
        ServerAuth("ident", USER, PASSWORD)


def test_error_packet_is_fatal_28p01():
    failure, _ = expect_failure(ServerAuth("password", USER, PASSWORD), ClientAuth(USER, "nope"))
    msg_type, payload = one_message(failure.error.packet())
    fields = protocol.parse_error_fields(payload)
    assert chr(msg_type) == "E"
    assert (fields["S"], fields["V"], fields["C"], fields["M"]) == ("FATAL", "FATAL", "28P01", FAILED)


def test_saslprep_is_applied_like_postgresql():
    # NFKC maps "Ⅸ" to "IX" and "ℌ" to "H", on both sides, as PostgreSQL's pg_saslprep does.
    server = ServerAuth("scram-sha-256", USER, auth.scram_verifier("Ⅸ ℌ"))
    assert run_exchange(server, ClientAuth(USER, "IX H")) == SCRAM_CODES
    assert run_exchange(ServerAuth("password", USER, auth.scram_verifier("Ⅸ ℌ")), ClientAuth(USER, "IX H"))


# ---------------------------------------------------------------- verifiers

VERIFIER_RE = re.compile(r"SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)")


def test_scram_verifier_is_postgresql_format():
    salt = bytes(range(16))
    match = VERIFIER_RE.fullmatch(auth.scram_verifier("pencil", salt))
    assert match
    iterations, salt_b64, stored_b64, server_b64 = match.groups()
    _, stored_key, server_key = rfc5802_keys("pencil", salt, 4096)
    assert (iterations, salt_b64, stored_b64, server_b64) == ("4096", b64(salt), b64(stored_key), b64(server_key))


def test_scram_verifier_defaults_and_iterations():
    first, second = auth.scram_verifier("pencil"), auth.scram_verifier("pencil")
    salt = base64.b64decode(VERIFIER_RE.fullmatch(first).group(2))
    assert first != second and len(salt) == 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
    verifier = auth.scram_verifier("pencil", salt, iterations=10000)
    assert VERIFIER_RE.fullmatch(verifier).group(1) == "10000"
    _, stored_key, _ = rfc5802_keys("pencil", salt, 10000)
    assert VERIFIER_RE.fullmatch(verifier).group(3) == b64(stored_key)
    assert run_exchange(ServerAuth("scram-sha-256", USER, verifier), ClientAuth(USER, "pencil")) == SCRAM_CODES


def test_verifier_made_by_postgresql():
    salt = base64.b64decode(VERIFIER_RE.fullmatch(PG_SCRAM_PENCIL).group(2))
    assert auth.scram_verifier("pencil", salt) == PG_SCRAM_PENCIL
    for method in ("scram-sha-256", "md5", "password"):
        assert run_exchange(ServerAuth(method, USER, PG_SCRAM_PENCIL), ClientAuth(USER, "pencil"))
    expect_failure(ServerAuth("scram-sha-256", USER, PG_SCRAM_PENCIL), ClientAuth(USER, "pencil2"))


def test_md5_secret_made_by_postgresql():
    assert auth.md5_secret("pencil", "m_user") == PG_MD5_PENCIL_M_USER
    assert run_exchange(ServerAuth("md5", "m_user", PG_MD5_PENCIL_M_USER), ClientAuth("m_user", "pencil"))


@pytest.mark.parametrize(("secret", "kind"), [
    ("pencil", "plain"),
    (PG_MD5_PENCIL_M_USER, "md5"),
    ("md5" + "A" * 32, "plain"),  # PostgreSQL's md5 hashes are lower-case hex
    ("md5abc", "plain"),
    (PG_SCRAM_PENCIL, "scram"),
])
def test_secret_kind(secret, kind):
    assert auth.secret_kind(secret) == kind


# ---------------------------------------------------------------- auth_file

def write(tmp_path, text: str | bytes) -> str:
    path = tmp_path / "users.txt"
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return str(path)


def test_load_auth_file(tmp_path):
    verifier = auth.scram_verifier("pw3")
    path = write(tmp_path, f'''; PgBouncer-style comment
# another comment

"alice" "pw1"
  "bob"   "{auth.md5_secret("pw2", "bob")}"
"carol"\t"{verifier}"   
"dave ""the quote""" "say ""hi"""
"eve" "has ; and # inside"
''')
    assert auth.load_auth_file(path) == {
        "alice": "pw1",
        "bob": auth.md5_secret("pw2", "bob"),
        "carol": verifier,
        'dave "the quote"': 'say "hi"',
        "eve": "has ; and # inside",
    }


def test_load_auth_file_empty_path():
    assert auth.load_auth_file("") == {}


@pytest.mark.parametrize(("line", "message"), [
    ('alice "pw"', "expected a double-quoted user name"),
    ('"alice"', "expected whitespace and a double-quoted secret after the user name"),
    ('"alice""pw"', "expected whitespace and a double-quoted secret after the user name"),
    ('"alice" pw', "expected a double-quoted secret"),
    ('"alice" "pw', "unterminated quoted secret"),
    ('"alice', "unterminated quoted user name"),
    ('"alice" "pw" extra', "unexpected text after the secret"),
    ('"" "pw"', "empty user name"),
    ('"alice" ""', 'empty secret for user "alice"'),
    ('"alice" "SCRAM-SHA-256$4096:abc"', 'SCRAM verifier must look like'),
    ('"alice" "SCRAM-SHA-256$4096:!!!!$AAAA:AAAA"', "SCRAM verifier has invalid base64 in its salt or keys"),
    ('"alice" "SCRAM-SHA-256$x:AAAAAAAAAAAAAAAAAAAAAA==$AAAA:AAAA"', "SCRAM verifier has an invalid iteration count 'x'"),
    ('"alice" "SCRAM-SHA-256$4096:AAAAAAAAAAAAAAAAAAAAAA==$AAAA:AAAA"', "SCRAM verifier keys must be 32 bytes long"),
])
def test_load_auth_file_errors_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path, f'"ok" "fine"\n\n{line}\n')
    with pytest.raises(AuthFileError) as info:
        auth.load_auth_file(path)
    assert str(info.value).startswith(f"{path}:3: {message}")
    assert (info.value.path, info.value.line) == (path, 3)


def test_load_auth_file_refuses_unsupported_verifier(tmp_path):
    short_salt = auth.scram_verifier("pw", bytes(16)).replace(b64(bytes(16)), b64(bytes(8)))
    low = auth.scram_verifier("pw").replace("$4096:", "$1000:")
    for verifier, message in [(short_salt, "salt is 8 bytes long"), (low, "iteration count 1000 is outside")]:
        path = write(tmp_path, f'"alice" "{verifier}"\n')
        with pytest.raises(AuthFileError, match=f"^{re.escape(path)}:1: .*{message}"):
            auth.load_auth_file(path)


def test_load_auth_file_duplicate_user(tmp_path):
    path = write(tmp_path, '"alice" "a"\n"bob" "b"\n"alice" "c"\n')
    with pytest.raises(AuthFileError) as info:
        auth.load_auth_file(path)
    assert str(info.value) == f'{path}:3: duplicate entry for user "alice" (first on line 1)'


def test_load_auth_file_invalid_utf8(tmp_path):
    path = write(tmp_path, b'"alice" "a"\n"b\xffb" "x"\n')
    with pytest.raises(AuthFileError, match=f"^{re.escape(path)}:2: invalid UTF-8$"):
        auth.load_auth_file(path)


def test_load_auth_file_unreadable(tmp_path):
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(AuthFileError) as info:
        auth.load_auth_file(missing)
    assert str(info.value) == f"{missing}: could not read auth_file: No such file or directory"
    with pytest.raises(AuthFileError, match=f"^{re.escape(str(tmp_path))}: could not read auth_file"):
        auth.load_auth_file(str(tmp_path))


def test_loaded_secrets_serve_every_method(tmp_path):
    path = write(tmp_path, f'"alice" "{PASSWORD}"\n"bob" "{auth.md5_secret(PASSWORD, "bob")}"\n'
                           f'"carol" "{auth.scram_verifier(PASSWORD)}"\n')
    users = auth.load_auth_file(path)
    for user in users:
        for method in METHODS:
            if method == "scram-sha-256" and user == "bob":
                expect_failure(ServerAuth(method, user, users.get(user)), ClientAuth(user, PASSWORD))
            else:
                assert run_exchange(ServerAuth(method, user, users.get(user)), ClientAuth(user, PASSWORD))


def test_a_plain_password_is_stretched_once_for_many_logins(monkeypatch):
    """PBKDF2 of a plain auth_file password (half of a login's CPU) runs once per listener, not per login;
    a wrong password still fails, and a password changed in the file (a reload) gets keys of its own."""
    auth._plain_scram_keys.cache_clear()
    calls = []
    real = auth._scram_keys
    monkeypatch.setattr(auth, "_scram_keys", lambda *a: calls.append(a) or real(*a))
    for _ in range(3):
        run_exchange(ServerAuth("scram-sha-256", USER, PASSWORD), ClientAuth(USER, PASSWORD))
    assert len(calls) == 1
    expect_failure(ServerAuth("scram-sha-256", USER, PASSWORD), ClientAuth(USER, "wrong"))
    assert len(calls) == 1
    run_exchange(ServerAuth("scram-sha-256", USER, "changed"), ClientAuth(USER, "changed"))
    expect_failure(ServerAuth("scram-sha-256", USER, "changed"), ClientAuth(USER, PASSWORD))
    assert len(calls) == 2
