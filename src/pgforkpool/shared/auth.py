"""Password authentication, sans-IO: the auth_file, a client's login to the pooler (ServerAuth) and the pooler's login upstream (ClientAuth)."""

import base64
import enum
import functools
import hashlib
import hmac
import secrets
import struct

import scramp
from scramp.utils import ServerError

from . import protocol
from .errors import PgError

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_PREFIX = "SCRAM-SHA-256$"
# PostgreSQL's SCRAM_DEFAULT_SALT_LEN, SCRAM_DEFAULT_ITERATIONS and SCRAM_SHA_256_KEY_LEN.
SCRAM_DEFAULT_SALT_LEN = 16
SCRAM_DEFAULT_ITERATIONS = 4096
SCRAM_KEY_LEN = 32

METHODS = ("trust", "password", "md5", "scram-sha-256")

_SCRAM = scramp.ScramMechanism(SCRAM_SHA_256)
# scramp refuses an empty SASL user name, which is what libpq sends and PostgreSQL
# ignores; this stands in for it inside scramp only, never on the wire.
_SCRAMP_USER = "pgforkpool"
# Like PostgreSQL's mock_auth_nonce: makes the fake salt of an unknown user stable
# for the life of the process tree (forked children inherit it) yet unguessable.
_MOCK_AUTH_NONCE = secrets.token_bytes(32)


# ---------------------------------------------------------------- secrets

class AuthFileError(Exception):
    """A problem in the auth_file, reported as "path:line: message"."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line, self.message = path, line, message
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {message}")


def secret_kind(secret: str) -> str:
    """The kind of an auth_file secret ("plain", "md5" or "scram"), as PostgreSQL's get_password_type tells."""
    if secret.startswith(SCRAM_PREFIX):
        return "scram"
    if len(secret) == 35 and secret.startswith("md5") and all(c in "0123456789abcdef" for c in secret[3:]):
        return "md5"
    return "plain"


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_secret(password: str, user: str) -> str:
    """The "md5..." hash PostgreSQL stores for password: md5(password + user)."""
    return "md5" + _md5_hex(password.encode() + user.encode())


def _md5_response(md5_hash: str, salt: bytes) -> str:
    """The answer to an MD5 challenge: "md5" + md5(md5(password + user) + salt)."""
    return "md5" + _md5_hex(md5_hash[3:].encode() + salt)


def _scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """StoredKey and ServerKey of password (SASLprep'd by scramp, as PostgreSQL does)."""
    _, stored_key, server_key, _ = _SCRAM.make_auth_info(password, iterations, salt)
    return stored_key, server_key


@functools.lru_cache(maxsize=256)
def _plain_scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """_scram_keys of a plain auth_file password at its user's fixed salt, computed once per listener:
    4,096 rounds of PBKDF2 cost about 1.4 ms of CPU, half of a whole login, and the result is what a
    verifier in the file would hold.  The keys are the file's own entries (and their users' salts), so
    no client can grow the cache."""
    return _scram_keys(password, salt, iterations)


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = SCRAM_DEFAULT_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL would store in pg_authid for password."""
    if salt is None:
        salt = secrets.token_bytes(SCRAM_DEFAULT_SALT_LEN)
    stored_key, server_key = _scram_keys(password, salt, iterations)
    salt_b64, stored_b64, server_b64 = (base64.b64encode(raw).decode() for raw in (salt, stored_key, server_key))
    return f"{SCRAM_PREFIX}{iterations}:{salt_b64}${stored_b64}:{server_b64}"


def parse_scram_verifier(secret: str) -> tuple[int, bytes, bytes, bytes]:
    """(iterations, salt, StoredKey, ServerKey) of a verifier; ValueError says what is wrong."""
    try:
        mechanism, iter_salt, keys = secret.split("$")
        iterations, salt_b64 = iter_salt.split(":")
        stored_b64, server_b64 = keys.split(":")
    except ValueError:
        raise ValueError('SCRAM verifier must look like "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"') from None
    if mechanism != SCRAM_SHA_256:
        raise ValueError(f"SCRAM verifier has mechanism {mechanism!r}, not {SCRAM_SHA_256!r}")
    if not iterations.isascii() or not iterations.isdigit():
        raise ValueError(f"SCRAM verifier has an invalid iteration count {iterations!r}")
    try:
        salt, stored_key, server_key = (base64.b64decode(part, validate=True)
                                        for part in (salt_b64, stored_b64, server_b64))
    except ValueError:
        raise ValueError("SCRAM verifier has invalid base64 in its salt or keys") from None
    if len(stored_key) != SCRAM_KEY_LEN or len(server_key) != SCRAM_KEY_LEN:
        raise ValueError(f"SCRAM verifier keys must be {SCRAM_KEY_LEN} bytes long")
    # Limits of scramp, which does the exchange; PostgreSQL 15 always writes 4096 and 16.
    low, high = scramp.core.IterationCount.MIN_ITERATION_COUNT, scramp.core.IterationCount.MAX_ITERATION_COUNT
    if not low <= int(iterations) <= high:
        raise ValueError(f"SCRAM verifier iteration count {iterations} is outside {low}..{high}, "
                         "the range supported here")
    if len(salt) < scramp.core.Salt.MIN_LENGTH:
        raise ValueError(f"SCRAM verifier salt is {len(salt)} bytes long, "
                         f"shorter than the {scramp.core.Salt.MIN_LENGTH} supported here")
    return int(iterations), salt, stored_key, server_key


def _read_quoted(line: str, pos: int, what: str) -> tuple[str, int]:
    """The double-quoted string at pos ("" inside is a quote) and the position after it."""
    if pos >= len(line) or line[pos] != '"':
        raise ValueError(f"expected a double-quoted {what}")
    value, pos = [], pos + 1
    while True:
        end = line.find('"', pos)
        if end < 0:
            raise ValueError(f"unterminated quoted {what}")
        value.append(line[pos:end])
        if line.startswith('""', end):
            value.append('"')
            pos = end + 2
        else:
            return "".join(value), end + 1


def _parse_auth_line(line: str) -> tuple[str, str]:
    user, pos = _read_quoted(line, len(line) - len(line.lstrip()), "user name")
    rest = line[pos:]
    if rest[:1] not in (" ", "\t"):
        raise ValueError("expected whitespace and a double-quoted secret after the user name")
    secret, pos = _read_quoted(line, len(line) - len(rest.lstrip()), "secret")
    if line[pos:].strip():
        raise ValueError("unexpected text after the secret")
    if not user:
        raise ValueError("empty user name")
    if not secret:
        raise ValueError(f'empty secret for user "{user}"')
    if secret_kind(secret) == "scram":
        parse_scram_verifier(secret)
    return user, secret


def load_auth_file(path: str) -> dict[str, str]:
    """user -> secret from a PgBouncer-style userlist ('"user" "secret"' lines)."""
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().splitlines()
    except OSError as e:
        raise AuthFileError(path, None, f"could not read auth_file: {e.strerror or e}") from None
    users: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode()
        except UnicodeDecodeError:
            raise AuthFileError(path, number, "invalid UTF-8") from None
        stripped = line.strip()
        if not stripped or stripped[0] in ";#":
            continue
        try:
            user, secret = _parse_auth_line(line)
        except ValueError as e:
            raise AuthFileError(path, number, str(e)) from None
        if user in users:
            raise AuthFileError(path, number, f'duplicate entry for user "{user}" (first on line {first_seen[user]})')
        users[user], first_seen[user] = secret, number
    return users


# ---------------------------------------------------------------- SCRAM helpers

def _swap_sasl_user(client_first_bare: str, user: str) -> str:
    """client-first-message-bare with its n= attribute replaced (PostgreSQL ignores it)."""
    return f"n={user}{client_first_bare[client_first_bare.index(','):]}"


def _mock_salt(user: str) -> bytes:
    """A salt that stays the same for user, as PostgreSQL's mock_scram_secret makes one."""
    return hashlib.sha256(user.encode() + _MOCK_AUTH_NONCE).digest()[:SCRAM_DEFAULT_SALT_LEN]


# ---------------------------------------------------------------- server side

class AuthFailed(Exception):
    """Authentication of a client failed: .error is the ErrorResponse to send it.

    .log_detail says why, for the server log only (the client must not learn
    whether the user exists), as PostgreSQL's logdetail does.
    """

    def __init__(self, error: PgError, log_detail: str | None = None):
        super().__init__(error.text)
        self.error = error
        self.log_detail = log_detail


def _protocol_violation(text: str, detail: str | None = None) -> AuthFailed:
    return AuthFailed(PgError("protocol_violation", text, detail=detail))


def _malformed_scram(detail: str) -> AuthFailed:
    return _protocol_violation("malformed SCRAM message", detail)


def _printable(char: str) -> str:
    """PostgreSQL's sanitize_char: 'c', or the code of a character that is not printable ("" is 0x00)."""
    if char and char.isascii() and char.isprintable():
        return f"'{char}'"
    return f"0x{ord(char or chr(0)):02x}"


def _attr_value(attrs: list[str], index: int, name: str) -> str:
    """The value of SCRAM attribute name at attrs[index], with read_attr_value's complaints."""
    attr = attrs[index] if index < len(attrs) else ""
    if attr[:1] != name:
        raise _malformed_scram(f'Expected attribute "{name}" but found "{_printable(attr[:1])}".')
    if attr[1:2] != "=":
        raise _malformed_scram(f'Expected character "=" for attribute "{name}".')
    return attr[2:]


class ServerState(enum.Enum):
    """Where a ServerAuth exchange stands: named after what it waits for."""
    INITIAL = "initial"
    AWAITING_PASSWORD = "awaiting PasswordMessage"
    AWAITING_SASL_INITIAL = "awaiting SASLInitialResponse"
    AWAITING_CLIENT_FIRST = "awaiting SCRAM client-first-message"
    AWAITING_CLIENT_FINAL = "awaiting SCRAM client-final-message"
    AUTHENTICATED = "authenticated"
    FAILED = "failed"


class ServerAuth:
    """Authenticates one client as PostgreSQL does for the method auth_method."""

    def __init__(self, method: str, user: str, secret: str | None):
        if method not in METHODS:
            raise ValueError(f"unknown authentication method {method!r}")
        self.method = method
        self.user = user
        self.secret = secret or None
        self.state = ServerState.INITIAL
        self.done = False
        self._md5_salt: bytes | None = None
        self._scram: "scramp.core.ScramServer | None" = None
        # Set when the SCRAM exchange runs on a mock secret and must fail at its end.
        self._doomed_detail: str | None = None
        self._cbind_input = ""  # the gs2 header the client-final-message must echo
        self._nonce = ""  # client nonce + server nonce, from the server-first-message

    # The one place the exchange moves on.
    def _transition(self, state: ServerState) -> None:
        self.state = state
        self.done = state is ServerState.AUTHENTICATED

    def _password_failed(self, log_detail: str | None) -> AuthFailed:
        return AuthFailed(PgError("invalid_password", f'password authentication failed for user "{self.user}"'),
                          log_detail)

    def start(self) -> bytes:
        """The first message to send the client (b"" for trust, which is then done)."""
        if self.state is not ServerState.INITIAL:
            raise RuntimeError("ServerAuth.start() called twice")
        if self.method == "trust":
            self._transition(ServerState.AUTHENTICATED)
            return b""
        if self.method == "password":
            self._transition(ServerState.AWAITING_PASSWORD)
            return protocol.authentication(protocol.AUTH_CLEARTEXT_PASSWORD)
        # md5 serves a user with a SCRAM verifier by SCRAM, as CheckPWChallengeAuth
        # does; an unknown user gets the method's usual challenge, so it blends in.
        if self.method == "md5" and (self.secret is None or secret_kind(self.secret) != "scram"):
            self._md5_salt = secrets.token_bytes(4)
            self._transition(ServerState.AWAITING_PASSWORD)
            return protocol.authentication(protocol.AUTH_MD5_PASSWORD, self._md5_salt)
        self._scram = _SCRAM.make_server(self._scram_secret)
        self._transition(ServerState.AWAITING_SASL_INITIAL)
        return protocol.authentication(protocol.AUTH_SASL, protocol.cstring(SCRAM_SHA_256) + b"\0")

    def feed(self, payload: bytes) -> bytes:
        """Takes one 'p' message payload; returns what to send next (b"" if nothing)."""
        handler = {
            ServerState.AWAITING_PASSWORD: self._password_message,
            ServerState.AWAITING_SASL_INITIAL: self._sasl_initial_response,
            ServerState.AWAITING_CLIENT_FIRST: self._client_first,
            ServerState.AWAITING_CLIENT_FINAL: self._client_final,
        }.get(self.state)
        try:
            if handler is None:
                raise _protocol_violation(f"unexpected password message ({self.state.value})")
            return handler(payload)
        except AuthFailed:
            self._transition(ServerState.FAILED)
            raise

    # -- PasswordMessage (password and md5 methods)

    def _password_message(self, payload: bytes) -> bytes:
        # recv_password_packet's checks, before the user is looked at.
        if payload.find(b"\0") != len(payload) - 1:
            raise _protocol_violation("invalid password packet size")
        password = payload[:-1]
        if not password:
            raise AuthFailed(PgError("invalid_password", "empty password returned by client"))
        if self.secret is None:
            raise self._password_failed(f'User "{self.user}" has no entry in auth_file.')
        if self._md5_salt is not None:
            ok = self._check_md5_response(password)
        else:
            ok = self._check_plain_password(password)
        if not ok:
            raise self._password_failed(f'Password does not match for user "{self.user}".')
        self._transition(ServerState.AUTHENTICATED)
        return b""

    def _check_md5_response(self, response: bytes) -> bool:
        kind = secret_kind(self.secret)
        md5_hash = self.secret if kind == "md5" else md5_secret(self.secret, self.user)
        return hmac.compare_digest(_md5_response(md5_hash, self._md5_salt).encode(), response)

    def _check_plain_password(self, password: bytes) -> bool:
        kind = secret_kind(self.secret)
        if kind == "plain":
            return hmac.compare_digest(self.secret.encode(), password)
        if kind == "md5":
            return hmac.compare_digest(("md5" + _md5_hex(password + self.user.encode())).encode(),
                                       self.secret.encode())
        # scram_verify_plain_password: recompute ServerKey with the verifier's salt.
        try:
            iterations, salt, _, server_key = parse_scram_verifier(self.secret)
            _, computed = _scram_keys(password.decode(), salt, iterations)
        except (ValueError, scramp.ScramException):
            return False
        return hmac.compare_digest(computed, server_key)

    # -- SASL (scram-sha-256, and md5 for a user with a SCRAM verifier)

    def _scram_secret(self, _sasl_user: str) -> tuple[bytes, bytes, bytes, int]:
        """scramp's auth_fn: (salt, StoredKey, ServerKey, iterations) of the startup user."""
        kind = None if self.secret is None else secret_kind(self.secret)
        if kind == "scram":
            try:
                iterations, salt, stored_key, server_key = parse_scram_verifier(self.secret)
                return salt, stored_key, server_key, iterations
            except ValueError as e:
                self._doomed_detail = f'User "{self.user}" has an invalid SCRAM secret: {e}.'
        elif kind == "plain":
            # The salt is the mock one so that the user looks the same on every attempt.
            try:
                salt = _mock_salt(self.user)
                return (salt, *_plain_scram_keys(self.secret, salt, SCRAM_DEFAULT_ITERATIONS),
                        SCRAM_DEFAULT_ITERATIONS)
            except scramp.ScramException as e:
                self._doomed_detail = f'User "{self.user}" has a password SASLprep rejects: {e}.'
        elif kind == "md5":
            self._doomed_detail = f'User "{self.user}" does not have a valid SCRAM secret.'
        else:
            self._doomed_detail = f'User "{self.user}" has no entry in auth_file.'
        # mock_scram_secret: go through the motions, then fail.
        return _mock_salt(self.user), bytes(SCRAM_KEY_LEN), bytes(SCRAM_KEY_LEN), SCRAM_DEFAULT_ITERATIONS

    def _sasl_initial_response(self, payload: bytes) -> bytes:
        end = payload.find(b"\0")
        if end < 0:
            raise _protocol_violation("invalid string in message")
        if payload[:end] != SCRAM_SHA_256.encode():
            raise _protocol_violation("client selected an invalid SASL authentication mechanism")
        if len(payload) < end + 5:
            raise _protocol_violation("insufficient data left in message")
        length = struct.unpack_from("!i", payload, end + 1)[0]
        data = payload[end + 5:]
        if length == -1 and not data:
            # No initial response: an empty challenge asks for the client-first-message.
            self._transition(ServerState.AWAITING_CLIENT_FIRST)
            return protocol.authentication(protocol.AUTH_SASL_CONTINUE)
        if length < 0 or length > len(data):
            raise _protocol_violation("insufficient data left in message")
        if length < len(data):
            raise _protocol_violation("invalid message format")
        return self._client_first(data)

    @staticmethod
    def _scram_text(data: bytes) -> str:
        if not data:
            raise _malformed_scram("The message is empty.")
        if b"\0" in data:
            raise _malformed_scram("Message length does not match input length.")
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise _malformed_scram("The message is not valid UTF-8.") from None

    def _client_first(self, data: bytes) -> bytes:
        text = self._scram_text(data)
        # Read as read_client_first_message does, for its wording.  No channel
        # binding is offered (no TLS): "n" and "y" are fine, "p=" is not.
        flag = text[0]
        if flag == "p":
            raise _malformed_scram("The client selected SCRAM-SHA-256 without channel binding, "
                                   "but the SCRAM message includes channel binding data.")
        if flag not in "ny":
            raise _malformed_scram(f'Unexpected channel-binding flag "{_printable(flag)}".')
        if text[1:2] != ",":
            raise _malformed_scram(f'Comma expected, but found character "{_printable(text[1:2])}".')
        if text[2:3] == "a":
            raise AuthFailed(PgError("feature_not_supported",
                                     "client uses authorization identity, but it is not supported"))
        if text[2:3] != ",":
            raise _malformed_scram(f'Unexpected attribute "{_printable(text[2:3])}" in client-first-message.')
        bare = text[3:]
        if bare[:1] == "m":
            raise AuthFailed(PgError("feature_not_supported", "client requires an unsupported SCRAM extension"))
        attrs = bare.split(",")
        _attr_value(attrs, 0, "n")  # the SASL user name, ignored: the startup user is the identity
        _attr_value(attrs, 1, "r")
        try:
            self._scram.set_client_first(text[:3] + _swap_sasl_user(bare, _SCRAMP_USER))
            # The AuthMessage that both proofs sign holds the bare message as sent.
            self._scram.client_first_bare = bare
            server_first = self._scram.get_server_first()
        except scramp.ScramException as e:
            raise _malformed_scram(str(e)) from None
        self._cbind_input = text[:3]
        self._nonce = server_first.split(",")[0][2:]
        self._transition(ServerState.AWAITING_CLIENT_FINAL)
        return protocol.authentication(protocol.AUTH_SASL_CONTINUE, server_first.encode())

    def _client_final(self, data: bytes) -> bytes:
        text = self._scram_text(data)
        # read_client_final_message's checks, then verify_final_nonce's.
        attrs = text.split(",")
        if _attr_value(attrs, 0, "c") != base64.b64encode(self._cbind_input.encode()).decode():
            raise _protocol_violation("unexpected SCRAM channel-binding attribute in client-final-message")
        nonce = _attr_value(attrs, 1, "r")
        # Extensions may come before the proof, nothing after it.
        proof_at = next((i for i in range(2, len(attrs)) if attrs[i].startswith("p=")), None)
        if proof_at is None:
            raise _malformed_scram("Attribute expected, but found end of string.")
        try:
            if len(base64.b64decode(attrs[proof_at][2:], validate=True)) != SCRAM_KEY_LEN:
                raise ValueError
        except ValueError:
            raise _malformed_scram("Malformed proof in client-final-message.") from None
        if proof_at != len(attrs) - 1:
            raise _malformed_scram("Garbage found at the end of client-final-message.")
        if nonce != self._nonce:
            raise _protocol_violation("invalid SCRAM response", "Nonce does not match.")
        try:
            self._scram.set_client_final(text)
            server_final = self._scram.get_server_final()
        except scramp.ScramException as e:
            if e.server_error is ServerError.INVALID_PROOF:
                raise self._password_failed(self._doomed_detail or
                                            f'Password does not match for user "{self.user}".') from None
            raise _malformed_scram(str(e)) from None
        if self._doomed_detail is not None:
            raise self._password_failed(self._doomed_detail)
        self._transition(ServerState.AUTHENTICATED)
        return protocol.authentication(protocol.AUTH_SASL_FINAL, server_final.encode())


# ---------------------------------------------------------------- client side

class ClientAuth:
    """Logs the pooler in to the upstream server: answers its Authentication requests."""

    def __init__(self, user: str, secret: str | None):
        self.user = user
        self.secret = secret or None
        self._scram: scramp.ScramClient | None = None
        self._scram_verified = False

    def respond(self, code: int, data: bytes) -> bytes:
        """The frontend message answering one upstream 'R' message (b"" if none is due)."""
        if code == protocol.AUTH_CLEARTEXT_PASSWORD:
            return protocol.password_message(protocol.cstring(self._plain_password("password")))
        if code == protocol.AUTH_MD5_PASSWORD:
            if len(data) != 4:
                raise PgError("protocol_violation", "invalid MD5 salt in authentication request")
            return protocol.password_message(protocol.cstring(_md5_response(self._md5_hash(), data)))
        if code == protocol.AUTH_SASL:
            return self._sasl_start(data)
        if code == protocol.AUTH_SASL_CONTINUE:
            return self._sasl_continue(data)
        if code == protocol.AUTH_SASL_FINAL:
            return self._sasl_final(data)
        if code == protocol.AUTH_OK:
            # Only a SCRAM exchange proves who the server is: it must have finished.
            if self._scram is not None and not self._scram_verified:
                raise PgError("protocol_violation", "server sent AuthenticationOk before the SCRAM exchange completed")
            return b""
        raise PgError("protocol_violation", f"authentication method {code} not supported")

    def _kind(self) -> str | None:
        return None if self.secret is None else secret_kind(self.secret)

    def _no_password(self, method: str) -> PgError:
        kind = self._kind()
        if kind is None:
            text = f'no password supplied for user "{self.user}" in auth_file'
        else:
            what = "an MD5 hash" if kind == "md5" else "a SCRAM verifier"
            text = (f'auth_file has only {what} for user "{self.user}", '
                    f"but the server requested {method} authentication")
        return PgError("sqlclient_unable_to_establish_sqlconnection", text)

    def _plain_password(self, method: str) -> str:
        if self._kind() != "plain":
            raise self._no_password(method)
        return self.secret

    def _md5_hash(self) -> str:
        kind = self._kind()
        if kind == "md5":
            return self.secret
        if kind == "plain":
            return md5_secret(self.secret, self.user)
        raise self._no_password("MD5")

    def _sasl_start(self, data: bytes) -> bytes:
        if self._scram is not None:
            raise PgError("protocol_violation", "server started a second SASL exchange")
        if SCRAM_SHA_256.encode() not in data.split(b"\0"):
            raise PgError("protocol_violation", "none of the server's SASL authentication mechanisms are supported")
        password = self._plain_password(SCRAM_SHA_256)
        try:
            self._scram = scramp.ScramClient([SCRAM_SHA_256], _SCRAMP_USER, password)
            scramp_first = self._scram.get_client_first()
        except scramp.ScramException as e:
            raise PgError("sqlclient_unable_to_establish_sqlconnection",
                          f'password for user "{self.user}" cannot be used with {SCRAM_SHA_256}: {e}') from None
        # Send an empty SASL user name, as libpq does; the startup user is the identity.
        gs2_header = scramp_first[:-len(self._scram.client_first_bare)]
        bare = _swap_sasl_user(self._scram.client_first_bare, "")
        self._scram.client_first_bare = bare
        return protocol.sasl_initial_response(SCRAM_SHA_256, (gs2_header + bare).encode())

    def _scram_step(self, code_name: str) -> scramp.ScramClient:
        if self._scram is None:
            raise PgError("protocol_violation", f"server sent {code_name} without starting a SASL exchange")
        return self._scram

    def _sasl_continue(self, data: bytes) -> bytes:
        client = self._scram_step("AuthenticationSASLContinue")
        try:
            client.set_server_first(data.decode())
            client_final = client.get_client_final()
        except (scramp.ScramException, UnicodeDecodeError) as e:
            raise PgError("protocol_violation", "malformed SCRAM message from server", detail=str(e)) from None
        return protocol.password_message(client_final.encode())

    def _sasl_final(self, data: bytes) -> bytes:
        client = self._scram_step("AuthenticationSASLFinal")
        try:
            client.set_server_final(data.decode())
        except (scramp.ScramException, UnicodeDecodeError) as e:
            raise PgError("protocol_violation", "incorrect server signature", detail=str(e)) from None
        self._scram_verified = True
        return b""
