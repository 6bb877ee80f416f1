"""Unit tests for the parameter table and the postgresql.conf-syntax loader (no server)."""

import re
from pathlib import Path

import pytest

from pgforkpool.shared.config import (
    PARAMETERS, ConfigError, Param, changed_restart_parameters, defaults, format_value,
    load_config, parse_value,
)

SAMPLE = Path(__file__).resolve().parents[2] / "conf" / "pgforkpool.conf"
PYTHON_TYPES = {"bool": bool, "int": int, "real": float, "string": str, "enum": str,
                "list": tuple, "duration": float, "size": int}


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def load_text(tmp_path: Path, text: str, overrides=()):
    return load_config(write(tmp_path, "pgforkpool.conf", text), overrides)


def error_of(tmp_path: Path, text: str, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, overrides)
    return str(info.value)


# --- the table -----------------------------------------------------------------------

def test_table_rows_are_well_formed():
    for name, param in PARAMETERS.items():
        assert name == param.name == name.lower()
        assert param.type in PYTHON_TYPES and param.context in ("restart", "reload")
        assert param.description
        assert type(param.default) is PYTHON_TYPES[param.type], name
        if param.type == "enum":
            assert param.default in param.enum_values
        if param.type in ("int", "real", "duration", "size"):
            assert param.min <= param.default <= param.max, name
        if param.type in ("duration", "size"):
            assert param.unit


def test_defaults():
    settings = defaults()
    assert list(settings.values) == list(PARAMETERS)
    assert set(settings.sources.values()) == {"default"}
    assert settings.path is None and settings.overrides == ()
    assert settings.listen_addresses == "localhost"
    assert settings.port == 6432
    assert settings.unix_socket_directories == ("/tmp",)
    assert settings.upstream_host == "/var/run/postgresql"
    assert settings.dedicated_databases == ("postgres", "template0", "template1")
    assert settings.dedicated_users == ("postgres",)
    assert settings.admin_users == ()
    assert settings.session_schedule == "round-robin"
    assert settings.auth_method == "scram-sha-256"
    assert settings.restart_pooler_on_reload is False
    assert settings.idle_pool_backend_timeout == 0
    assert settings.authentication_timeout == 60.0
    assert settings.upstream_connect_timeout == 10.0
    assert settings.max_pinned_sessions == 100
    assert settings.log_min_messages == "warning"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such"):
        defaults().no_such
    assert not hasattr(defaults(), "__setstate__")


def test_load_without_file_is_defaults():
    assert load_config(None) == defaults()


# --- values of every type ------------------------------------------------------------

BOOL = Param("b", "bool", False, "reload", "test")
INT = Param("i", "int", 5, "reload", "test", min=-10, max=100)
REAL = Param("r", "real", 0.5, "reload", "test", min=0, max=1)
STRING = Param("s", "string", "", "reload", "test")
ENUM = Param("e", "enum", "one", "reload", "test", enum_values=("one", "two-words"))
LIST = Param("l", "list", (), "reload", "test")
SECONDS = Param("d", "duration", 0.0, "reload", "test", min=0, max=864000, unit="s")
MILLISECONDS = Param("m", "duration", 0.0, "reload", "test", min=0, max=864000, unit="ms")
KILOBYTES = Param("z", "size", 0, "reload", "test", min=0, max=1 << 50, unit="kB")
BYTES = Param("y", "size", 0, "reload", "test", min=0, max=1 << 50, unit="B")


@pytest.mark.parametrize("param, text, value", [
    *[(BOOL, word, True) for word in ("on", "ON", "true", "True", "yes", "1", "t", "y")],
    *[(BOOL, word, False) for word in ("off", "Off", "false", "no", "0", "f", "n", "N")],
    (INT, "42", 42), (INT, "-10", -10), (INT, "+7", 7), (INT, "0x10", 16), (INT, " 3 ", 3),
    (REAL, "0.25", 0.25), (REAL, "1", 1.0), (REAL, "1e-3", 0.001), (REAL, ".5", 0.5),
    (STRING, " keep  spaces ", " keep  spaces "), (STRING, "", ""),
    (ENUM, "one", "one"), (ENUM, "Two-Words", "two-words"),
    (LIST, "a, b ,c", ("a", "b", "c")), (LIST, "", ()), (LIST, " , a,,", ("a",)),
    (LIST, "Mixed Case", ("Mixed Case",)),
    (SECONDS, "60s", 60.0), (SECONDS, "1min", 60.0), (SECONDS, "500ms", 0.5),
    (SECONDS, "1h", 3600.0), (SECONDS, "1d", 86400.0), (SECONDS, "250us", 0.00025),
    (SECONDS, "30", 30.0), (SECONDS, "0", 0.0), (SECONDS, "1.5min", 90.0),
    (SECONDS, "10 s", 10.0), (MILLISECONDS, "250", 0.25), (MILLISECONDS, "2s", 2.0),
    (KILOBYTES, "8", 8192), (KILOBYTES, "8kB", 8192), (KILOBYTES, "512B", 512),
    (KILOBYTES, "1MB", 1 << 20), (KILOBYTES, "1GB", 1 << 30), (KILOBYTES, "1TB", 1 << 40),
    (KILOBYTES, "1.5kB", 1536), (BYTES, "100", 100), (BYTES, "0", 0),
])
def test_valid_values(param, text, value):
    parsed = parse_value(param, text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("param, text", [
    (BOOL, "maybe"), (BOOL, "of"), (BOOL, ""), (BOOL, "2"),
    (INT, "abc"), (INT, "1.5"), (INT, ""), (INT, "12abc"),
    (REAL, "x"), (REAL, "nan"),
    (ENUM, "three"), (ENUM, ""),
    (SECONDS, "abc"), (SECONDS, "10 sec"), (SECONDS, "10S"), (SECONDS, "1m"), (SECONDS, ""),
    (SECONDS, "s"), (SECONDS, "1e400"), (KILOBYTES, "1KB"), (KILOBYTES, "1mb"), (KILOBYTES, "1s"),
])
def test_invalid_values(param, text):
    with pytest.raises(ConfigError, match=f'invalid value for parameter "{param.name}"'):
        parse_value(param, text)


def test_invalid_value_hints():
    with pytest.raises(ConfigError) as info:
        parse_value(ENUM, "three")
    assert info.value.hint == "Available values: one, two-words."
    with pytest.raises(ConfigError) as info:
        parse_value(SECONDS, "5 sec")
    assert '"ms"' in info.value.hint and '"min"' in info.value.hint


@pytest.mark.parametrize("param, text, message", [
    (INT, "101", 'is outside the valid range for parameter "i" (-10 .. 100)'),
    (INT, "-11", '-11 is outside'),
    (REAL, "1.5", '1.5 is outside the valid range for parameter "r" (0 .. 1)'),
    (SECONDS, "-1", '-1s is outside'),
    (SECONDS, "11d", '11d is outside the valid range for parameter "d" (0 .. 10d)'),
])
def test_out_of_range(param, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_value(param, text)


@pytest.mark.parametrize("param, value, text", [
    (BOOL, True, "on"), (BOOL, False, "off"), (INT, -3, "-3"),
    (REAL, 0.5, "0.5"), (REAL, 1.0, "1"), (REAL, 1e-05, "1e-05"),
    (LIST, ("a", "b"), "a, b"), (LIST, (), ""),
    (SECONDS, 0.0, "0"), (SECONDS, 60.0, "1min"), (SECONDS, 90.0, "90s"),
    (SECONDS, 0.5, "500ms"), (SECONDS, 0.00025, "250us"), (SECONDS, 7200.0, "2h"),
    (MILLISECONDS, 86400.0, "1d"),
    (KILOBYTES, 8192, "8kB"), (KILOBYTES, 1536, "1536B"), (KILOBYTES, 1 << 30, "1GB"),
    (BYTES, 0, "0"),
])
def test_format_value(param, value, text):
    assert format_value(param, value) == text
    assert parse_value(param, text) == value


# --- file syntax ---------------------------------------------------------------------

def test_file_syntax(tmp_path):
    settings = load_text(tmp_path, """
# a comment line
   # an indented comment

port 7000
Session_Pool_Size=20
MAX_SESSIONS   =   30   # trailing comment
listen_addresses = '*'
upstream_host = /run/postgresql
auth_file = 'it''s \\'here\\' #not a comment'
user = ''
dedicated_users = 'alice, bob'   # comment after a quoted value
pid_file = 'tab\\there\\nnewline\\\\back\\101'
log_min_messages = ERROR
hold_prepared_transactions on
idle_pool_backend_timeout = 5min
authentication_timeout = 30
""")
    assert settings.port == 7000
    assert settings.session_pool_size == 20
    assert settings.max_sessions == 30
    assert settings.listen_addresses == "*"
    assert settings.upstream_host == "/run/postgresql"
    assert settings.auth_file == "it's 'here' #not a comment"
    assert settings.user == ""
    assert settings.dedicated_users == ("alice", "bob")
    assert settings.pid_file == "tab\there\nnewline\\backA"
    assert settings.log_min_messages == "error"
    assert settings.hold_prepared_transactions is True
    assert settings.idle_pool_backend_timeout == 300.0
    assert settings.authentication_timeout == 30.0
    path = str(tmp_path / "pgforkpool.conf")
    assert settings.path == path
    assert settings.sources["port"] == f"{path}:5"
    assert settings.sources["max_sessions"] == f"{path}:7"
    assert settings.sources["admin_users"] == "default"


def test_later_setting_wins(tmp_path):
    settings = load_text(tmp_path, "port = 7000\nport = 7001\n")
    assert settings.port == 7001
    assert settings.sources["port"].endswith("pgforkpool.conf:2")


def test_crlf_line_endings(tmp_path):
    assert load_text(tmp_path, "port = 7000\r\nuser = 'pg'\r\n").user == "pg"


@pytest.mark.parametrize("line, near", [
    ("port =", "end of line"),
    ("port = # no value", "end of line"),
    ("port = 1 2", '"2"'),
    ("port == 1", '"="'),
    ("user = 'unterminated", "\"'unterminated\""),
    ("user = 'a' 'b'", "\"'b'\""),
    ("listen_addresses = *", '"*"'),
    ("= 5", '"="'),
    ("port = 5;", '";"'),
])
def test_syntax_errors(tmp_path, line, near):
    path = tmp_path / "pgforkpool.conf"
    message = error_of(tmp_path, f"# first line\n{line}\n")
    assert message == f"{path}:2: syntax error near {near}"


def test_unknown_parameter_names_file_and_line(tmp_path):
    message = error_of(tmp_path, "port = 7000\n\nNo_Such_Thing = 1\n")
    assert message == f'{tmp_path / "pgforkpool.conf"}:3: unrecognized configuration parameter "No_Such_Thing"'


def test_bad_value_names_file_and_line(tmp_path):
    message = error_of(tmp_path, "\n\n\n\n\n\n\n\n\n\n\nport = abc\n")
    assert message == f'{tmp_path / "pgforkpool.conf"}:12: invalid value for parameter "port": "abc"'


def test_bad_enum_value_carries_hint(tmp_path):
    message = error_of(tmp_path, "session_schedule = fastest\n")
    assert message.endswith(':1: invalid value for parameter "session_schedule": "fastest"\n'
                            "HINT:  Available values: round-robin, random, load-balancing.")


@pytest.mark.parametrize("line, message", [
    ("port = 0", '0 is outside the valid range for parameter "port" (1 .. 65535)'),
    ("port = 65536", "65536 is outside"),
    ("session_pool_size = 0", '"session_pool_size" (1 .. 10000)'),
    ("connection_pool_workers = 65", '"connection_pool_workers" (1 .. 64)'),
    ("max_pinned_sessions = -1", '"max_pinned_sessions" (0 .. 100000)'),
    ("authentication_timeout = 500ms",
     '500ms is outside the valid range for parameter "authentication_timeout" (1s .. 10min)'),
    ("authentication_timeout = 601", "601s is outside"),
    ("idle_pool_backend_timeout = -1", "-1s is outside"),
])
def test_out_of_range_in_file(tmp_path, line, message):
    assert message in error_of(tmp_path, line + "\n")


def test_first_error_fails_the_whole_load(tmp_path):
    message = error_of(tmp_path, "port = 7000\nport = abc\nuser = 'x'\nbogus = 1\n")
    assert message.endswith(':2: invalid value for parameter "port": "abc"')


def test_missing_main_file(tmp_path):
    path = tmp_path / "absent.conf"
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f'could not open configuration file "{path}": No such file or directory'


def test_relative_main_path_is_reported_absolute(tmp_path, monkeypatch):
    write(tmp_path, "rel.conf", "port = 7000\n")
    monkeypatch.chdir(tmp_path)
    settings = load_config("rel.conf")
    assert settings.path == str(tmp_path / "rel.conf")
    assert settings.sources["port"] == f"{tmp_path / 'rel.conf'}:1"


# --- includes ------------------------------------------------------------------------

def test_include_is_relative_to_the_including_file(tmp_path):
    write(tmp_path, "sub/a.conf", "port = 7001\ninclude 'b.conf'\n")
    write(tmp_path, "sub/b.conf", "\nuser = 'b'\n")
    settings = load_text(tmp_path, "port = 7000\ninclude = 'sub/a.conf'\nmax_sessions = 5\n")
    assert settings.port == 7001 and settings.user == "b" and settings.max_sessions == 5
    assert settings.sources["port"] == f"{tmp_path / 'sub' / 'a.conf'}:1"
    assert settings.sources["user"] == f"{tmp_path / 'sub' / 'b.conf'}:2"


def test_include_then_override(tmp_path):
    write(tmp_path, "a.conf", "port = 7001\n")
    assert load_text(tmp_path, "include 'a.conf'\nport = 7002\n").port == 7002


def test_include_absolute_path(tmp_path):
    other = write(tmp_path, "elsewhere/x.conf", "port = 7003\n")
    assert load_text(tmp_path, f"INCLUDE '{other}'\n").port == 7003


def test_missing_include_names_the_include_line(tmp_path):
    message = error_of(tmp_path, "\ninclude 'nope.conf'\n")
    assert message == (f'{tmp_path / "pgforkpool.conf"}:2: could not open configuration file '
                       f'"{tmp_path / "nope.conf"}": No such file or directory')


def test_include_if_exists_skips_a_missing_file(tmp_path):
    write(tmp_path, "there.conf", "user = 'there'\n")
    settings = load_text(tmp_path, "include_if_exists 'nope.conf'\ninclude_if_exists 'there.conf'\n")
    assert settings.user == "there"


def test_error_inside_included_file_names_that_file(tmp_path):
    write(tmp_path, "bad.conf", "port = 7000\nport = x\n")
    message = error_of(tmp_path, "include 'bad.conf'\n")
    assert message == f'{tmp_path / "bad.conf"}:2: invalid value for parameter "port": "x"'


def test_include_dir_reads_conf_files_in_name_order(tmp_path):
    write(tmp_path, "conf.d/20-b.conf", "port = 7020\nuser = 'b'\n")
    write(tmp_path, "conf.d/10-a.conf", "port = 7010\nmax_sessions = 10\n")
    write(tmp_path, "conf.d/.30-hidden.conf", "this is not valid\n")
    write(tmp_path, "conf.d/40-notes.txt", "neither is this\n")
    write(tmp_path, "conf.d/50-dir.conf/x.conf", "nor this\n")
    settings = load_text(tmp_path, "include_dir 'conf.d'\n")
    assert (settings.port, settings.user, settings.max_sessions) == (7020, "b", 10)
    assert settings.sources["max_sessions"] == f"{tmp_path / 'conf.d' / '10-a.conf'}:2"


def test_include_dir_missing_is_an_error(tmp_path):
    message = error_of(tmp_path, "include_dir 'nope.d'\n")
    assert message.startswith(f'{tmp_path / "pgforkpool.conf"}:1: could not open configuration directory')


def test_empty_include_name_is_an_error(tmp_path):
    assert error_of(tmp_path, "include ''\n").endswith(':1: empty file name in "include"')


def test_include_recursion_is_stopped(tmp_path):
    message = error_of(tmp_path, "include 'pgforkpool.conf'\n")
    assert message.endswith("maximum nesting depth exceeded")
    assert message.startswith(f'{tmp_path / "pgforkpool.conf"}:1: could not open configuration file')


def test_include_depth_limit_is_ten(tmp_path):
    for level in range(1, 11):
        write(tmp_path, f"{level}.conf", f"include '{level + 1}.conf'\n")
    write(tmp_path, "11.conf", "port = 7011\n")
    # The main file is depth 0, so 1.conf .. 10.conf are fine and 11.conf is too deep.
    assert "maximum nesting depth exceeded" in error_of(tmp_path, "include '1.conf'\n")
    write(tmp_path, "10.conf", "port = 7010\n")
    assert load_text(tmp_path, "include '1.conf'\n").port == 7010


# --- command-line overrides ----------------------------------------------------------

def test_overrides_win_over_the_file(tmp_path):
    settings = load_text(tmp_path, "port = 7000\nuser = 'file'\n",
                         ["port=7001", "max-sessions=5", "Admin_Users=a, b", "user= spaced "])
    assert settings.port == 7001 and settings.max_sessions == 5
    assert settings.admin_users == ("a", "b") and settings.user == " spaced "
    assert settings.sources["port"] == "command line"
    assert settings.overrides == ("port=7001", "max-sessions=5", "Admin_Users=a, b", "user= spaced ")


def test_overrides_without_file():
    settings = load_config(None, ["auth_method=trust", "idle_pool_backend_timeout=10min"])
    assert settings.auth_method == "trust" and settings.idle_pool_backend_timeout == 600.0
    assert settings.path is None


@pytest.mark.parametrize("override, message", [
    ("port=abc", 'command line: invalid value for parameter "port": "abc"'),
    ("nosuch=1", 'command line: unrecognized configuration parameter "nosuch"'),
    ("port", 'command line: -c "port" requires a value of the form name=value'),
    ("port=0", 'command line: 0 is outside the valid range for parameter "port" (1 .. 65535)'),
])
def test_bad_override(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message


# --- reload --------------------------------------------------------------------------

def test_changed_restart_parameters():
    old = defaults()
    new = load_config(None, ["pid_file=/run/p.pid", "port=7000", "max_sessions=1",
                             "unix_socket_directories=/tmp"])
    assert changed_restart_parameters(old, new) == ["port", "pid_file"]
    assert changed_restart_parameters(old, load_config(None, ["session_pool_size=3"])) == []
    assert changed_restart_parameters(new, new) == []


# --- SHOW ----------------------------------------------------------------------------

def test_setting_text():
    settings = defaults()
    assert settings.setting_text("port") == "6432"
    assert settings.setting_text("authentication_timeout") == "1min"
    assert settings.setting_text("idle_pool_backend_timeout") == "0"
    assert settings.setting_text("restart_pooler_on_reload") == "off"
    assert settings.setting_text("dedicated_databases") == "postgres, template0, template1"
    assert settings.setting_text("admin_users") == ""
    assert settings.setting_text("session_schedule") == "round-robin"


NON_DEFAULT = ["listen_addresses=*", "unix_socket_directories=/a, /b", "admin_users=",
               "idle_pool_backend_timeout=1500ms", "authentication_timeout=90",
               "upstream_connect_timeout=2min", "restart_pooler_on_reload=yes",
               "session_schedule=RANDOM", "log_min_messages=debug2", "user=it's"]


@pytest.mark.parametrize("start", [[], NON_DEFAULT], ids=["defaults", "non-defaults"])
def test_setting_text_round_trips_through_overrides(start):
    settings = load_config(None, start)
    again = load_config(None, [f"{name}={settings.setting_text(name)}" for name in PARAMETERS])
    assert again.values == settings.values


# --- the sample file -----------------------------------------------------------------

def test_sample_file_loads():
    settings = load_config(str(SAMPLE))
    assert settings.listen_addresses == "localhost" and settings.port == 6432
    assert settings.sources["port"].startswith(f"{SAMPLE}:")
    assert settings.sources["unix_socket_directories"] == "default"


def test_sample_file_lists_every_parameter():
    text = SAMPLE.read_text()
    listed = re.findall(r"^#?([a-z_]+) = ", text, re.MULTILINE)
    assert [name for name in listed if name in PARAMETERS] == list(PARAMETERS)


def test_sample_file_shows_the_defaults(tmp_path):
    # Uncommenting every parameter line of the sample must give exactly the defaults.
    lines = [line[1:] if (m := re.match(r"#([a-z_]+) = ", line)) and m.group(1) in PARAMETERS else line
             for line in SAMPLE.read_text().splitlines()]
    settings = load_text(tmp_path, "\n".join(lines))
    assert settings.values == defaults().values
    assert all(source != "default" for source in settings.sources.values())
