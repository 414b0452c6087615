"""The key file and Config: GLib's parsing rules and qemu-ga's quirks.

The expected values come from running the real qemu-ga 7.2 with ``-D`` on
the same files (tests/compat/test_cli.py checks the same table against it).
"""

from __future__ import annotations

import pytest

from qga.config import (
    DEFAULT_SERIAL_PATH, DEFAULT_VIRTIO_PATH, Config, KeyFile, KeyFileError, config_file_path,
    dump, escape_value, load_file, split_rpc_list, unescape_value,
)
from qga.errors import ConfigError

# (key file, {attribute: expected value}) — files qemu-ga accepts.
ACCEPTED = [
    (b"[general]\nmethod = unix-listen  \npath=  /a b  \n",
     {"method": "unix-listen  ", "path": "/a b  "}),
    (b"[general]\npath=\\s x\\ty\\nz\\\\w\\r\n", {"path": "  x\ty\nz\\w\r"}),
    (b"# c\n\n[general]\n# c2\n  # indented comment\npath=x\n", {"path": "x"}),
    (b"[general]\npath=x\npath=y\n[other]\nk=v\n[general]\nlogfile=l\n",
     {"path": "y", "logfile": "l"}),
    (b"[general]\ndaemon=1\nverbose=0\nretry-path=true \n",
     {"daemonize": True, "verbose": False, "retry_path": True}),
    (b"[general]\ndaemon= true\n", {"daemonize": True}),
    (b"[general]\nverbose=true\n", {"verbose": True}),
    (b"[general]\nblock-rpcs=guest-ping;guest-get-time\n",
     {"block_rpcs": ["guest-ping;guest-get-time"]}),
    (b"[general]\nblock-rpcs=a,b,c\n", {"block_rpcs": ["c", "b", "a"]}),
    (b"[general]\nblock-rpcs=,a,,b,\n", {"block_rpcs": ["", "b", "", "a", ""]}),
    (b"[general]\nblock-rpcs=\n", {"block_rpcs": []}),
    (b"[general]\nallow-rpcs=\n", {"allow_rpcs": None}),
    (b"[general]\nallow-rpcs=a,b\nblock-rpcs=b\n", {"allow_rpcs": ["b", "a"], "block_rpcs": ["b"]}),
    (b"[general]\nblacklist=a,b\n", {"block_rpcs": ["b", "a"]}),
    (b"[general]\nblacklist=a,b\nblock-rpcs=c\n", {"block_rpcs": ["b", "a"]}),
    (b"[general]\npath[de]=x\n", {"path": None}),
    (b"[general]\nbad key=x\n", {"path": None}),
    (b"", {"path": None}),
    (b"[general]\n", {"path": None}),
    (b"[general]\r\npath=crlf\r\n", {"path": "crlf"}),
    (b"  [general]\npath=lead\n", {"path": "lead"}),
    (b"[general]  \npath=trail\n", {"path": "trail"}),
    (b"[general]\npath=\n", {"path": ""}),
    (b"[general]\n  path  =  v\n", {"path": "v"}),
    (b"[general]\npath=a=b\n", {"path": "a=b"}),
    (b"[general]\npath=x", {"path": "x"}),
    (b"[general]\npath=x\x00y\n", {"path": "x"}),
    (b"[General]\npath=x\n", {"path": None}),
    (b"[general]\nPath=x\n", {"path": None}),
    (b"[general]\npath=\\\\s\n", {"path": "\\s"}),
    (b"[general]\nfsfreeze-hook=\n", {"fsfreeze_hook": ""}),
    (b"[general]\n\xff=x\n", {"path": None}),
    (b"[gen eral]\npath=x\n", {"path": None}),
    (b"[general]\ndaemonize=true\n", {"daemonize": False}),
    (b"[qga]\nfile-allow-dirs=/srv,,/tmp/x\nexec-allow-programs=/bin/true,ls\n"
     b"fsfreeze-max-frozen-time=90\n",
     {"file_allow_dirs": ["/srv", "/tmp/x"], "exec_allow_programs": ["/bin/true", "ls"],
      "fsfreeze_max_frozen_time": 90}),
    (b"[qga]\nfsfreeze-max-frozen-time=1.5\n", {"fsfreeze_max_frozen_time": 1.5}),
]

# (key file, GLib's message) — files qemu-ga refuses.
REFUSED = [
    (b"[general]\npath=a\\qb\n",
     "Key file contains key \u201cpath\u201d which has a value that cannot be interpreted."),
    (b"[general]\npath=a\\\n",
     "Key file contains key \u201cpath\u201d which has a value that cannot be interpreted."),
    (b"[general]\npath=\\ \n",
     "Key file contains key \u201cpath\u201d which has a value that cannot be interpreted."),
    (b"path=x\n[general]\n", "Key file does not start with a group"),
    (b"[general]\ndaemon=True\n",
     "Key file contains key \u201cdaemon\u201d which has a value that cannot be interpreted."),
    (b"[general]\ndaemon=yes\n",
     "Key file contains key \u201cdaemon\u201d which has a value that cannot be interpreted."),
    (b"[general]\ndaemon=\n",
     "Key file contains key \u201cdaemon\u201d which has a value that cannot be interpreted."),
    (b"[general]\ndaemon=true\\s\n",
     "Key file contains key \u201cdaemon\u201d which has a value that cannot be interpreted."),
    (b"[general]\nverbose=maybe\n",
     "Key file contains key \u201cverbose\u201d which has a value that cannot be interpreted."),
    # Several bad values: the first one read is reported.
    (b"[general]\nverbose=alsobad\ndaemon=maybe\n",
     "Key file contains key \u201cdaemon\u201d which has a value that cannot be interpreted."),
    (b"[general]\nfoo\n",
     "Key file contains line \u201cfoo\u201d which is not a key-value pair, group, or comment"),
    (b"[general]\nmethod\n",
     "Key file contains line \u201cmethod\u201d which is not a key-value pair, group, or comment"),
    (b"[general\npath=x\n",
     "Key file contains line \u201c[general\u201d which is not a key-value pair, group, or comment"),
    (b"[a]b\n[general]\n",
     "Key file contains line \u201c[a]b\u201d which is not a key-value pair, group, or comment"),
    (b"[general]\n=x\n",
     "Key file contains line \u201c=x\u201d which is not a key-value pair, group, or comment"),
    (b"\xef\xbb\xbf[general]\npath=bom\n",
     "Key file contains line \u201c\ufeff[general]\u201d which is not a key-value pair, group,"
     " or comment"),
    (b"[]\n", "Invalid group name: "),
    (b"[a[b]\n", "Invalid group name: a[b"),
    (b"[gen\x01eral]\npath=x\n", "Invalid group name: gen\x01eral"),
    (b"[general]\npa[th=x\n", "Invalid key name: pa[th"),
    (b"[general]\npath]=x\n", "Invalid key name: path]"),
    (b"[general]\npath[=x\n", "Invalid key name: path["),
    (b"[general]\npath=\xff\n",
     "Key file contains key \u201cpath\u201d with value \u201c\ufffd\u201d which is not UTF-8"),
    (b"[qga]\nfsfreeze-max-frozen-time=soon\n",
     "Key file contains key \u201cfsfreeze-max-frozen-time\u201d which has a value that cannot"
     " be interpreted."),
    (b"[qga]\nfsfreeze-max-frozen-time=-1\n",
     "Key file contains key \u201cfsfreeze-max-frozen-time\u201d which has a value that cannot"
     " be interpreted."),
    (b"[qga]\nfile-allow-dirs=relative/dir\n",
     "Key file contains key \u201cfile-allow-dirs\u201d which has a value that cannot"
     " be interpreted."),
]


def write(tmp_path, data: bytes) -> str:
    path = tmp_path / "qemu-ga.conf"
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("data, expected", ACCEPTED, ids=[repr(d)[:60] for d, _ in ACCEPTED])
def test_accepted_files(tmp_path, data, expected):
    config = Config()
    load_file(config, write(tmp_path, data))
    for name, value in expected.items():
        assert getattr(config, name) == value, name


@pytest.mark.parametrize("data, message", REFUSED, ids=[repr(d)[:60] for d, _ in REFUSED])
def test_refused_files(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_file(Config(), path)
    assert str(caught.value) == f"error loading configuration from path: {path}, {message}"


def test_missing_default_file_is_ignored(tmp_path):
    config = Config()
    load_file(config, str(tmp_path / "absent.conf"))
    assert config == Config(config_path=str(tmp_path / "absent.conf"))


def test_missing_required_file_is_fatal(tmp_path):
    path = str(tmp_path / "absent.conf")
    with pytest.raises(ConfigError, match="No such file or directory$"):
        load_file(Config(), path, required=True)


def test_directory_is_not_a_regular_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_file(Config(), str(tmp_path))
    assert str(caught.value) == f"error loading configuration from path: {tmp_path}, Not a regular file"


def test_other_open_errors_are_fatal(tmp_path):
    # Only a missing default file is ignored; here a path component is a file.
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(ConfigError) as caught:
        load_file(Config(), str(plain / "qemu-ga.conf"))
    assert str(caught.value) == (f"error loading configuration from path: {plain}/qemu-ga.conf,"
                                 " Not a directory")


def test_blacklist_key_warns(tmp_path):
    warnings = []
    load_file(Config(), write(tmp_path, b"[general]\nblacklist=a\n"), warn=warnings.append)
    assert warnings == ["config using deprecated 'blacklist' key, should be replaced"
                        " with the 'block-rpcs' key."]


def test_lists_accumulate_and_scalars_are_replaced(tmp_path):
    config = Config()
    load_file(config, write(tmp_path, b"[general]\nblock-rpcs=a,b\nmethod=isa-serial\n"))
    config.add_block_rpcs("x,y")
    config.method = "unix-listen"
    assert config.block_rpcs == ["b", "a", "y", "x"]
    assert config.method == "unix-listen"


@pytest.mark.parametrize("text, items", [
    ("", []), ("a", ["a"]), ("a,b", ["b", "a"]), (",", ["", ""]),
    ("guest-ping;guest-info", ["guest-ping;guest-info"]),
])
def test_split_rpc_list_is_qemu_split_list(text, items):
    assert split_rpc_list(text) == items


def test_empty_allow_list_is_no_list():
    config = Config()
    config.add_allow_rpcs("")
    assert config.allow_rpcs is None
    config.add_allow_rpcs("guest-ping")
    assert config.allow_rpcs == ["guest-ping"]


@pytest.mark.parametrize("text", ["", " x\ty", "\t\tlead", "a\nb\r\\c", "\\s", "trailing  "])
def test_escape_round_trip(text):
    assert unescape_value(escape_value(text)) == text


def test_escape_is_glib_set_string():
    assert escape_value("  x\ty\nz\\w\r") == "\\s\\sx\ty\\nz\\\\w\\r"


def test_resolve_path_defaults():
    virtio = Config()
    virtio.resolve_path()
    assert virtio.path == DEFAULT_VIRTIO_PATH
    serial = Config(method="isa-serial")
    serial.resolve_path()
    assert serial.path == DEFAULT_SERIAL_PATH
    given = Config(method="isa-serial", path="/dev/ttyS1")
    given.resolve_path()
    assert given.path == "/dev/ttyS1"
    for method in ("unix-listen", "vsock-listen", "bogus", ""):
        with pytest.raises(ConfigError, match="^must specify a path for this channel$"):
            Config(method=method).resolve_path()


def test_config_file_path_follows_qga_conf():
    assert config_file_path({}) == "/etc/qemu/qemu-ga.conf"
    assert config_file_path({"QGA_CONF": "/x.conf"}) == "/x.conf"


def test_config_rejects_unknown_settings():
    with pytest.raises(TypeError):
        Config(colour="blue")


def test_dump_layout():
    config = Config(path="/dev/vport0p1", logfile="/var/log/qga.log", fsfreeze_hook=" hook",
                    verbose=True, block_rpcs=["b", "a"], allow_rpcs=["guest-ping"],
                    file_allow_dirs=["/srv"], fsfreeze_max_frozen_time=30)
    assert dump(config) == (
        b"[general]\n"
        b"daemon=false\n"
        b"method=virtio-serial\n"
        b"path=/dev/vport0p1\n"
        b"logfile=/var/log/qga.log\n"
        b"pidfile=/var/run/qemu-ga.pid\n"
        b"fsfreeze-hook=\\shook\n"
        b"statedir=/var/run\n"
        b"verbose=true\n"
        b"retry-path=false\n"
        b"block-rpcs=b,a\n"
        b"allow-rpcs=guest-ping\n"
        b"\n"
        b"[qga]\n"
        b"file-allow-dirs=/srv\n"
        b"exec-allow-programs=\n"
        b"fsfreeze-max-frozen-time=30\n"
    )


def test_dump_reloads_to_the_same_config(tmp_path):
    config = Config(method="unix-listen", path="/run/q sock", logfile="\tlog",
                    block_rpcs=["guest-exec"], allow_rpcs=["guest-ping", "guest-info"],
                    exec_allow_programs=["/bin/true"], fsfreeze_max_frozen_time=2.5, retry_path=True)
    path = write(tmp_path, dump(config))
    again = Config()
    load_file(again, path)
    for name in ("method", "path", "logfile", "retry_path", "exec_allow_programs",
                 "fsfreeze_max_frozen_time"):
        assert getattr(again, name) == getattr(config, name)
    # Lists come back reversed: qemu-ga's split_list() prepends.
    assert again.allow_rpcs == ["guest-info", "guest-ping"]


def test_keyfile_keeps_locale_keys_apart():
    keyfile = KeyFile.parse(b"[general]\npath[de]=x\npath=y\n")
    assert keyfile.get_string("general", "path") == "y"
    assert keyfile.has_key("general", "path[de]")


def test_keyfile_error_is_a_config_error():
    with pytest.raises(ConfigError):
        KeyFile.parse(b"nonsense")
    assert issubclass(KeyFileError, ConfigError)
