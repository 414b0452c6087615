"""guest-file-* handlers called directly, checked against what qemu-ga 7.2 answers.

The expected values were measured on the real qemu-ga (tests/compat runs the
same requests against both agents over the wire).
"""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from qga.commands import Context
from qga.commands import files
from qga.commands.files import FileTable, decode_base64
from qga.config import Config
from qga.errors import CommandError
from qga.protocol import AsciiText, encode_value
from qga.state import COUNTER_FILE, StateDir
from tests.support.replies import validate_return


def checked(handler):
    """The handler, with every value it returns checked against the schema on the wire."""

    def call(*args, **kwargs):
        value = handler(*args, **kwargs)
        wire_value = json.loads(encode_value({} if value is None else value))
        validate_return(None, handler.qapi_command, wire_value)
        return value

    return call


file_open = checked(files.file_open)
file_close = checked(files.file_close)
file_read = checked(files.file_read)
file_write = checked(files.file_write)
file_seek = checked(files.file_seek)
file_flush = checked(files.file_flush)


@pytest.fixture
def ctx(tmp_path):
    statedir = tmp_path / "state"
    statedir.mkdir()
    context = Context(Config(), StateDir(str(statedir)))
    yield context
    context.close()


@pytest.fixture
def hello(tmp_path):
    path = tmp_path / "hello"
    path.write_bytes(b"hello")
    return str(path)


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(CommandError) as caught:
        call(*args, **kwargs)
    assert caught.value.error_class == "GenericError"
    return caught.value.desc


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- open ------------------------------------------------------------------------------


def test_handles_come_from_the_persistent_counter(ctx, hello, tmp_path):
    first = file_open(ctx, hello)
    second = file_open(ctx, hello, "r")
    assert (first, second) == (1000, 1001)
    file_close(ctx, first)
    assert file_open(ctx, hello) == 1002  # closed numbers are not reused
    assert (tmp_path / "state" / COUNTER_FILE).read_text() == "[global]\nfd_counter=1003\n"


def test_open_errors(ctx, tmp_path, hello):
    assert error_of(file_open, ctx, hello, "rw") == "invalid file open mode 'rw'"
    missing = str(tmp_path / "missing")
    assert error_of(file_open, ctx, missing) == (
        f"failed to open file '{missing}' (mode: 'r'): No such file or directory")
    assert error_of(file_open, ctx, str(tmp_path), "w") == (
        f"failed to open file '{tmp_path}' (mode: 'w'): Is a directory")
    assert error_of(file_open, ctx, "") == (
        "failed to open file '' (mode: 'r'): No such file or directory")


@pytest.mark.parametrize("mode, flags", [
    ("r", os.O_RDONLY), ("rb", os.O_RDONLY), ("r+", os.O_RDWR), ("rb+", os.O_RDWR),
    ("r+b", os.O_RDWR), ("w", os.O_WRONLY), ("wb", os.O_WRONLY), ("w+", os.O_RDWR),
    ("wb+", os.O_RDWR), ("w+b", os.O_RDWR), ("a", os.O_WRONLY | os.O_APPEND),
    ("ab", os.O_WRONLY | os.O_APPEND), ("a+", os.O_RDWR | os.O_APPEND),
    ("ab+", os.O_RDWR | os.O_APPEND), ("a+b", os.O_RDWR | os.O_APPEND),
])
def test_modes_and_descriptor_flags(ctx, hello, mode, flags):
    handle = file_open(ctx, hello, mode)
    fd = ctx.service(FileTable).get(handle).fd
    status = os.get_blocking(fd), os.get_inheritable(fd)
    assert status == (False, False)  # O_NONBLOCK, O_CLOEXEC
    access = os.O_ACCMODE | os.O_APPEND
    assert _fd_flags(fd) & access == flags
    truncated = mode.startswith("w")
    assert os.path.getsize(hello) == (0 if truncated else 5)


def _fd_flags(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as info:
        for line in info:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


def test_new_files_get_0666_whatever_the_umask(ctx, tmp_path):
    old = os.umask(0o077)
    try:
        file_open(ctx, str(tmp_path / "new"), "w")
        existing = tmp_path / "existing"
        existing.write_bytes(b"x")
        existing.chmod(0o600)
        file_open(ctx, str(existing), "a")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o666
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600  # an existing file keeps its mode


def test_fifo_opens_without_blocking(ctx, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    handle = file_open(ctx, str(fifo))
    assert file_read(ctx, handle) == {"count": 0, "buf-b64": "", "eof": True}
    assert error_of(file_seek, ctx, handle, 0, "cur") == "failed to seek file: Illegal seek"
    file_close(ctx, handle)
    # Without a reader, a non-blocking open for writing fails instead of waiting.
    assert error_of(file_open, ctx, str(fifo), "w") == (
        f"failed to open file '{fifo}' (mode: 'w'): No such device or address")


def test_nul_in_a_path_reaches_the_kernel_as_c0_80(ctx, tmp_path):
    file_open(ctx, str(tmp_path / "a\0b"), "w")
    assert b"a\xc0\x80b" in os.listdir(os.fsencode(tmp_path))
    assert error_of(file_open, ctx, str(tmp_path / "x\0y")) == (
        f"failed to open file '{tmp_path}/x\0y' (mode: 'r'): No such file or directory")
    assert error_of(file_open, ctx, str(tmp_path / "a"), "r\0") == "invalid file open mode 'r\0'"


def test_counter_write_failure_fails_the_open_and_closes_the_file(ctx, hello, tmp_path):
    counter = tmp_path / "state" / COUNTER_FILE
    counter.unlink()
    counter.mkdir()
    before = open_descriptors()
    assert error_of(file_open, ctx, hello) == "failed to commit persistent state to disk"
    assert open_descriptors() == before
    counter.rmdir()
    assert file_open(ctx, hello) == 1001  # the failed open used up 1000, as in qemu-ga


def test_negative_counter_answers_minus_one_like_qemu_ga(tmp_path, hello):
    statedir = tmp_path / "state"
    statedir.mkdir()
    (statedir / COUNTER_FILE).write_text("[global]\nfd_counter=-2\n")
    context = Context(Config(), StateDir(str(statedir)))
    before = open_descriptors()
    assert file_open(context, hello) == -1
    assert open_descriptors() == before
    assert file_open(context, hello) == -1
    assert file_open(context, hello) == 0
    assert len(context.service(FileTable)) == 1
    context.close()


# -- read -------------------------------------------------------------------------------


def test_read_eof_follows_feof(ctx, hello):
    handle = file_open(ctx, hello)
    assert file_read(ctx, handle, 0) == {"count": 0, "buf-b64": "", "eof": False}
    assert file_read(ctx, handle, 3) == {"count": 3, "buf-b64": b"aGVs", "eof": False}
    assert file_read(ctx, handle, 3) == {"count": 2, "buf-b64": b"bG8=", "eof": True}
    assert file_read(ctx, handle, 3) == {"count": 0, "buf-b64": "", "eof": True}
    file_seek(ctx, handle, 0, "set")
    # Exactly the rest of the file: no read hit the end yet.
    assert file_read(ctx, handle, 5) == {"count": 5, "buf-b64": b"aGVsbG8=", "eof": False}


def test_read_returns_ascii_text(ctx, hello):
    reply = file_read(ctx, file_open(ctx, hello))
    assert type(reply["buf-b64"]) is AsciiText
    assert list(reply) == ["count", "buf-b64", "eof"]  # qemu-ga's member order


def test_read_default_count_is_4096(ctx, tmp_path):
    path = tmp_path / "big"
    path.write_bytes(b"x" * 5000)
    handle = file_open(ctx, str(path))
    assert file_read(ctx, handle)["count"] == 4096
    assert file_read(ctx, handle) == {"count": 904, "buf-b64": b64(b"x" * 904).encode(),
                                      "eof": True}


def test_read_count_limits(ctx, hello):
    handle = file_open(ctx, hello)
    assert error_of(file_read, ctx, handle, -1) == "value '-1' is invalid for argument count"
    assert error_of(file_read, ctx, handle, 50331649) == (
        "value '50331649' is invalid for argument count")
    assert file_read(ctx, handle, 50331648) == {"count": 5, "buf-b64": b"aGVsbG8=", "eof": True}
    assert error_of(file_read, ctx, 999, 1) == "handle '999' has not been found"


def test_read_of_48_mib(ctx, tmp_path):
    data = os.urandom(1 << 20) * 48
    path = tmp_path / "big"
    path.write_bytes(data)
    reply = file_read(ctx, file_open(ctx, str(path)), files.READ_COUNT_MAX)
    assert reply["count"] == len(data) and reply["eof"] is False
    assert reply["buf-b64"] == base64.b64encode(data)


def _peak_rss_since_reset() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_big_count_on_a_small_file_costs_no_memory(ctx, hello):
    handle = file_open(ctx, hello)
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    before = _peak_rss_since_reset()
    assert file_read(ctx, handle, files.READ_COUNT_MAX)["count"] == 5
    assert _peak_rss_since_reset() - before < 8 * 1024 * 1024


def test_read_errors(ctx, tmp_path, hello):
    directory = file_open(ctx, str(tmp_path))
    assert error_of(file_read, ctx, directory) == "failed to read file: Is a directory"
    assert file_read(ctx, directory, 0)["count"] == 0
    write_only = file_open(ctx, hello, "w")
    assert error_of(file_read, ctx, write_only) == "failed to read file: Bad file descriptor"


def test_fifo_with_too_little_data_is_an_error_and_loses_it(ctx, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    handle = file_open(ctx, str(fifo))
    writer = os.open(fifo, os.O_WRONLY)
    try:
        os.write(writer, b"abc")
        assert file_read(ctx, handle, 2) == {"count": 2, "buf-b64": b"YWI=", "eof": False}
        assert error_of(file_read, ctx, handle, 2) == (
            "failed to read file: Resource temporarily unavailable")
        os.write(writer, b"def")
        assert file_read(ctx, handle, 3)["buf-b64"] == b64(b"def").encode()
    finally:
        os.close(writer)
    assert file_read(ctx, handle, 3) == {"count": 0, "buf-b64": "", "eof": True}


# -- write --------------------------------------------------------------------------------


def test_write_count_rules(ctx, tmp_path):
    handle = file_open(ctx, str(tmp_path / "out"), "w+")
    assert error_of(file_write, ctx, handle, "aGVsbG8=", 6) == (
        "value '6' is invalid for argument count")
    assert error_of(file_write, ctx, handle, "aGVsbG8=", -1) == (
        "value '-1' is invalid for argument count")
    assert file_write(ctx, handle, "aGVsbG8=", 3) == {"count": 3, "eof": False}
    assert file_write(ctx, handle, "aGVsbG8=", 0) == {"count": 0, "eof": False}
    assert file_write(ctx, handle, "") == {"count": 0, "eof": False}
    assert error_of(file_write, ctx, handle, "!!", 0) == "Base64 data contains invalid characters"
    file_flush(ctx, handle)
    assert (tmp_path / "out").read_bytes() == b"hel"


def test_write_then_read_without_seek_is_at_eof(ctx, tmp_path):
    # test-qga's check.
    handle = file_open(ctx, str(tmp_path / "foo"), "w+")
    assert file_write(ctx, handle, b64(b"foobar")) == {"count": 6, "eof": False}
    assert file_read(ctx, handle) == {"count": 0, "buf-b64": "", "eof": True}
    assert file_seek(ctx, handle, 0, "set") == {"eof": False, "position": 0}
    assert file_read(ctx, handle)["buf-b64"] == b64(b"foobar").encode()


def test_write_after_read_on_a_pipe_fails_like_fseek(ctx, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    handle = file_open(ctx, str(fifo), "r+")
    assert file_write(ctx, handle, "WFg=")["count"] == 2
    assert file_read(ctx, handle, 2)["buf-b64"] == b"WFg="
    assert error_of(file_write, ctx, handle, "WFg=") == "failed to seek file: Illegal seek"
    file_flush(ctx, handle)  # back to the neutral state: writing works again
    assert file_write(ctx, handle, "WFg=")["count"] == 2
    assert file_read(ctx, handle, 2)["count"] == 2
    file_flush(ctx, handle)
    # A read that fails does not count as reading: the next write needs no seek.
    assert error_of(file_read, ctx, handle, 1) == (
        "failed to read file: Resource temporarily unavailable")
    assert file_write(ctx, handle, "WFla")["count"] == 3


def test_write_to_a_read_only_handle(ctx, hello):
    handle = file_open(ctx, hello)
    assert error_of(file_write, ctx, handle, "WFg=") == "failed to write to file: Bad file descriptor"
    assert file_write(ctx, handle, "") == {"count": 0, "eof": False}


def test_append_mode_writes_at_the_end(ctx, hello):
    handle = file_open(ctx, hello, "a+")
    file_seek(ctx, handle, 0, "set")
    assert file_read(ctx, handle, 2)["buf-b64"] == b"aGU="
    file_write(ctx, handle, b64(b"XY"))
    assert file_seek(ctx, handle, 0, "cur")["position"] == 7
    with open(hello, "rb") as stream:
        assert stream.read() == b"helloXY"


def test_write_of_48_mib(ctx, tmp_path):
    data = os.urandom(1 << 20) * 48
    handle = file_open(ctx, str(tmp_path / "big"), "w")
    assert file_write(ctx, handle, b64(data)) == {"count": len(data), "eof": False}
    assert (tmp_path / "big").read_bytes() == data


# qbase64_decode's alphabet and GLib's lenient decoder, as measured on qemu-ga.
BASE64_CASES = [
    ("aGVsbG8=", b"hello"),
    ("YQ==YWJj", b"aabc"),
    ("AB=C", b"\x00\x02"),
    ("YWJ", b""),
    ("Y\nW\nJj", b"abc"),
    ("====", b"\x00"),
    ("=", b""),
    ("YQ=", b""),
    ("YQ", b""),
    ("YWJjZA", b"abc"),
    ("YQ=\nYWJj", b"a\x18"),
    ("A=AA", b"\x00\x00\x00"),
    ("AAA=AAA=", b"\x00\x00\x00\x00"),
    ("YWJj=", b"abc"),
    ("YQ===", b"a"),
    ("aGVsbG8=\n", b"hello"),
    ("\n", b""),
    ("", b""),
]


@pytest.mark.parametrize("text, data", BASE64_CASES)
def test_base64_decoding_matches_qemu(text, data):
    assert decode_base64(text) == data
    assert files._decode_base64_like_glib(text) == data  # the general path, on every Python


@pytest.mark.parametrize("text", ["aGVs\0!!!", "aGVs\0", "aGVs bG8=", "aGVs-G8_", "aGVsbG8\u00e9",
                                  "aGVs\tbG8=", "aGVs\rbG8="])
def test_base64_invalid_characters(text):
    with pytest.raises(CommandError) as caught:
        decode_base64(text)
    assert caught.value.desc == "Base64 data contains invalid characters"


# -- seek ----------------------------------------------------------------------------------


def test_seek_rules(ctx, hello):
    handle = file_open(ctx, hello)
    assert error_of(file_seek, ctx, handle, 0, 3) == "invalid whence code 3"
    assert error_of(file_seek, ctx, handle, 0, -1) == "invalid whence code -1"
    assert error_of(file_seek, ctx, handle, -1, "set") == "failed to seek file: Invalid argument"
    assert error_of(file_seek, ctx, handle, -1, 0) == "failed to seek file: Invalid argument"
    assert file_seek(ctx, handle, 100, "end") == {"eof": False, "position": 105}
    assert list(file_seek(ctx, handle, 2, 0)) == ["eof", "position"]  # qemu-ga's member order
    assert file_seek(ctx, handle, 1, 1) == {"eof": False, "position": 3}
    assert file_seek(ctx, handle, -1, 2) == {"eof": False, "position": 4}
    assert error_of(file_seek, ctx, handle, 2 ** 63 - 1, "end") == (
        "failed to seek file: Invalid argument")


def test_seek_on_dev_null_reports_the_real_position(ctx):
    handle = file_open(ctx, "/dev/null", "r+")
    assert file_seek(ctx, handle, 5, "set") == {"eof": False, "position": 0}


def test_flush_and_close(ctx, hello):
    handle = file_open(ctx, hello)
    fd = ctx.service(FileTable).get(handle).fd
    assert file_flush(ctx, handle) is None
    assert file_close(ctx, handle) is None
    with pytest.raises(OSError):
        os.fstat(fd)
    assert error_of(file_close, ctx, handle) == f"handle '{handle}' has not been found"
    assert error_of(file_flush, ctx, handle) == f"handle '{handle}' has not been found"


def test_context_close_closes_every_file(ctx, hello):
    fds = [ctx.service(FileTable).get(file_open(ctx, hello)).fd for _ in range(3)]
    ctx.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


# -- file-allow-dirs ------------------------------------------------------------------------


@pytest.fixture
def fenced(tmp_path):
    """A context limited to tmp_path/allowed; tmp_path/outside holds a secret."""
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "file").write_bytes(b"inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    statedir = tmp_path / "state"
    statedir.mkdir()
    config = Config()
    config.file_allow_dirs = [str(allowed)]
    context = Context(config, StateDir(str(statedir)))
    yield context, allowed, outside
    context.close()


def refused(context, path, mode="r") -> None:
    assert error_of(file_open, context, path, mode) == (
        f"failed to open file '{path}' (mode: '{mode}'): Permission denied")


def test_allowed_directory_works(fenced):
    context, allowed, _ = fenced
    handle = file_open(context, str(allowed / "sub" / "file"))
    assert file_read(context, handle)["buf-b64"] == b64(b"inside").encode()
    file_open(context, str(allowed / "sub" / "new"), "w")
    assert stat.S_IMODE((allowed / "sub" / "new").stat().st_mode) == 0o666
    file_open(context, str(allowed), "r")  # the directory itself
    assert error_of(file_open, context, str(allowed / "missing")).endswith(
        "No such file or directory")


def test_paths_outside_are_refused(fenced, caplog):
    context, allowed, outside = fenced
    refused(context, str(outside / "secret"))
    refused(context, str(outside / "new"), "w")
    refused(context, str(allowed / ".." / "outside" / "secret"))
    refused(context, "/etc/passwd")
    refused(context, str(allowed) + "-sibling")
    assert not (outside / "new").exists()
    assert "outside file-allow-dirs" in caplog.text


def test_symlinks_are_judged_by_their_target(fenced):
    context, allowed, outside = fenced
    (allowed / "escape").symlink_to(outside / "secret")
    refused(context, str(allowed / "escape"))
    (allowed / "escape-dir").symlink_to(outside)
    refused(context, str(allowed / "escape-dir" / "secret"))
    (outside / "back").symlink_to(allowed / "sub" / "file")
    handle = file_open(context, str(outside / "back"))  # resolves inside: fine
    assert file_read(context, handle)["buf-b64"] == b64(b"inside").encode()


def test_relative_paths_resolve_against_the_cwd(fenced, monkeypatch):
    context, allowed, outside = fenced
    monkeypatch.chdir(allowed)
    file_open(context, "sub/file")
    refused(context, "../outside/secret")


def test_a_symlink_swapped_in_after_the_check_does_not_escape(fenced):
    context, allowed, outside = fenced
    table = context.service(FileTable)
    opener = table._opener_for(str(allowed / "sub" / "file"), "r")
    # Between the check and the open, "sub" becomes a link to the outside.
    (allowed / "sub").rename(allowed / "old-sub")
    (allowed / "sub").symlink_to(outside)
    (outside / "file").write_bytes(b"secret")
    with pytest.raises(OSError):
        opener(os.O_RDONLY | os.O_CLOEXEC, 0)
    opener = table._opener_for(str(allowed / "old-sub" / "new"), "w")
    (allowed / "old-sub").rename(allowed / "gone")
    (allowed / "old-sub").symlink_to(outside)
    with pytest.raises(OSError):
        opener(os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    assert not (outside / "new").exists()


def test_no_limit_by_default(ctx, tmp_path):
    assert Config().file_allow_dirs == []
    file_open(ctx, "/etc/hostname" if os.path.exists("/etc/hostname") else "/dev/null")


def test_each_agent_context_has_its_own_table(ctx, hello, tmp_path):
    handle = file_open(ctx, hello)
    other_state = tmp_path / "other-state"
    other_state.mkdir()
    other = Context(Config(), StateDir(str(other_state)))
    try:
        assert error_of(file_read, other, handle) == f"handle '{handle}' has not been found"
    finally:
        other.close()
    assert file_read(ctx, handle, 1)["count"] == 1
