"""guest-exec / guest-exec-status handlers, with and without the agent's loop."""

from __future__ import annotations

import base64
import json
import os
import signal
import time

import pytest

from qga.commands import Context
from qga.commands import exec as exec_module
from qga.commands.exec import ExecTable, find_program
from qga.config import Config
from qga.errors import CommandError
from qga.loop import Loop
from qga.protocol import AsciiText, encode_value
from qga.state import StateDir
from tests.support.replies import validate_return


def checked(handler):
    """The handler, with every value it returns checked against the schema on the wire."""

    def call(*args, **kwargs):
        value = handler(*args, **kwargs)
        validate_return(None, handler.qapi_command, json.loads(encode_value(value)))
        return value

    return call


guest_exec = checked(exec_module.guest_exec)
guest_exec_status = checked(exec_module.guest_exec_status)


def wait_for_children(context) -> None:
    """Test hygiene: wait for every child still in the table (the agent would not)."""
    table = context.existing_service(ExecTable)
    for records in list(table._records.values()) if table else []:
        for record in records:
            if record.wait_status is None:
                os.waitpid(record.pid, 0)
                record.wait_status = 0


@pytest.fixture
def ctx(tmp_path):
    statedir = tmp_path / "state"
    statedir.mkdir()
    context = Context(Config(), StateDir(str(statedir)))
    yield context
    wait_for_children(context)
    context.close()


@pytest.fixture
def loop_ctx(tmp_path):
    statedir = tmp_path / "state"
    statedir.mkdir()
    loop = Loop()
    context = Context(Config(), StateDir(str(statedir)), loop)
    yield context
    wait_for_children(context)
    context.close()
    loop.close()


def finish(context, pid: int, timeout: float = 20.0) -> dict:
    """Ask for the status until the child has exited (pumping the loop if any)."""
    deadline = time.monotonic() + timeout
    while True:
        if context.loop is not None:
            context.loop.run_once(0.01)
        reply = guest_exec_status(context, pid)
        if reply["exited"]:
            return reply
        assert time.monotonic() < deadline, f"pid {pid} still running"
        time.sleep(0.002)


def run(context, path, **arguments) -> dict:
    return finish(context, guest_exec(context, path, **arguments)["pid"])


def decoded(reply: dict, stream: str) -> bytes:
    return base64.b64decode(bytes(reply[f"{stream}-data"]))


def spawn_error(context, path, **arguments) -> str:
    with pytest.raises(CommandError) as caught:
        guest_exec(context, path, **arguments)
    assert caught.value.error_class == "GenericError"
    return caught.value.desc


def is_zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture(params=["no-loop", "loop"])
def any_ctx(request):
    """Each test twice: handlers alone (status polls) and with the agent's loop."""
    return request.getfixturevalue("ctx" if request.param == "no-loop" else "loop_ctx")


# -- results ---------------------------------------------------------------------------


def test_exit_code_and_separate_streams(any_ctx):
    reply = run(any_ctx, "/bin/sh", arg=["-c", "echo out; echo err >&2; exit 3"],
                capture_output=True)
    assert reply == {"exitcode": 3, "err-data": b"ZXJyCg==", "out-data": b"b3V0Cg==",
                     "err-truncated": False, "out-truncated": False, "exited": True}
    assert list(reply) == ["exitcode", "err-data", "out-data", "err-truncated",
                           "out-truncated", "exited"]  # qemu-ga's member order
    assert type(reply["out-data"]) is AsciiText


def test_killed_by_a_signal(any_ctx):
    reply = run(any_ctx, "sh", arg=["-c", "kill -9 $$"], capture_output=True)
    assert reply == {"signal": 9, "exited": True}


def test_without_capture_there_is_no_data(any_ctx):
    assert run(any_ctx, "sh", arg=["-c", "echo hi; echo ho >&2"]) == {"exitcode": 0,
                                                                      "exited": True}
    assert run(any_ctx, "sh", arg=["-c", "echo hi"], capture_output=False) == {
        "exitcode": 0, "exited": True}
    assert run(any_ctx, "true", capture_output=True) == {"exitcode": 0, "exited": True}


@pytest.mark.parametrize("mode, expected", [
    ("none", {}),
    ("stdout", {"out": b"out\n"}),
    ("stderr", {"err": b"err\n"}),
    ("separated", {"out": b"out\n", "err": b"err\n"}),
    ("merged", {"out": b"out\nerr\nout2\n"}),
])
def test_capture_modes(any_ctx, mode, expected):
    reply = run(any_ctx, "sh", arg=["-c", "echo out; echo err >&2; echo out2 >&${FD:-1}"],
                env=["FD=1" if mode != "separated" else "FD=1"], capture_output=mode)
    if mode == "separated":
        expected = {"out": b"out\nout2\n", "err": b"err\n"}
    elif mode == "stdout":
        expected = {"out": b"out\nout2\n"}
    got = {stream: decoded(reply, stream) for stream in ("out", "err")
           if f"{stream}-data" in reply}
    assert got == expected


def test_unknown_pid_and_the_record_is_freed_once(any_ctx):
    pid = guest_exec(any_ctx, "true")["pid"]
    finish(any_ctx, pid)
    with pytest.raises(CommandError) as caught:
        guest_exec_status(any_ctx, pid)
    assert caught.value.desc == "PID ld does not exist"  # upstream's literal text
    with pytest.raises(CommandError):
        guest_exec_status(any_ctx, 123456789)


def test_running_child_reports_not_exited(any_ctx):
    pid = guest_exec(any_ctx, "sleep", arg=["5"], capture_output=True)["pid"]
    try:
        assert guest_exec_status(any_ctx, pid) == {"exited": False}
    finally:
        os.kill(pid, signal.SIGKILL)
    assert finish(any_ctx, pid) == {"signal": 9, "exited": True}


def test_exited_waits_for_the_pipes(any_ctx):
    # The child exits at once but its own child keeps stdout open a while.
    pid = guest_exec(any_ctx, "sh", arg=["-c", "(sleep 0.3; echo late) &"],
                     capture_output=True)["pid"]
    time.sleep(0.1)
    assert guest_exec_status(any_ctx, pid) == {"exited": False}
    reply = finish(any_ctx, pid)
    assert decoded(reply, "out") == b"late\n"


def test_status_of_a_child_writing_without_end_returns(any_ctx):
    pid = guest_exec(any_ctx, "yes", capture_output=True)["pid"]
    try:
        time.sleep(0.05)  # yes is running and keeps its pipe full
        started = time.monotonic()
        for _ in range(3):
            assert guest_exec_status(any_ctx, pid) == {"exited": False}
        assert time.monotonic() - started < 5
    finally:
        os.kill(pid, signal.SIGKILL)
    reply = finish(any_ctx, pid)
    assert reply["signal"] == 9 and len(decoded(reply, "out")) > 0


def test_output_is_truncated_at_16_mib(any_ctx):
    reply = run(any_ctx, "head", arg=["-c", "16777217", "/dev/zero"], capture_output=True)
    assert reply["out-truncated"] is True
    assert decoded(reply, "out") == bytes(16 * 1024 * 1024)
    reply = run(any_ctx, "head", arg=["-c", "16777216", "/dev/zero"], capture_output=True)
    assert reply["out-truncated"] is False
    assert len(decoded(reply, "out")) == 16 * 1024 * 1024


# -- input -------------------------------------------------------------------------------


def test_input_data_reaches_stdin(any_ctx):
    reply = run(any_ctx, "cat", input_data=base64.b64encode(b"some input").decode(),
                capture_output=True)
    assert decoded(reply, "out") == b"some input"


def test_big_input_is_fed_without_blocking(any_ctx):
    data = os.urandom(3 * 1024 * 1024)
    reply = run(any_ctx, "cat", input_data=base64.b64encode(data).decode(),
                capture_output=True)
    assert decoded(reply, "out") == data


def test_stdin_is_dev_null_or_an_empty_pipe(any_ctx):
    reply = run(any_ctx, "sh", arg=["-c", "wc -c; readlink /proc/self/fd/0"],
                capture_output=True)
    assert decoded(reply, "out") == b"0\n/dev/null\n"
    reply = run(any_ctx, "sh", arg=["-c", "wc -c; readlink /proc/self/fd/0"], input_data="",
                capture_output=True)
    assert decoded(reply, "out").startswith(b"0\npipe:")


def test_input_the_child_never_reads(any_ctx):
    data = os.urandom(1024 * 1024)
    assert run(any_ctx, "true", input_data=base64.b64encode(data).decode()) == {
        "exitcode": 0, "exited": True}


def test_bad_input_data(any_ctx):
    assert spawn_error(any_ctx, "cat", input_data="!!!") == "Base64 data contains invalid characters"


# -- program, arguments, environment -----------------------------------------------------------


def test_argv_zero_is_the_path_as_given(any_ctx):
    reply = run(any_ctx, "sh", arg=["-c", 'echo "$0|$1|$2"', "x", "", "y z"],
                capture_output=True)
    assert decoded(reply, "out") == b"x||y z\n"


def test_env_replaces_the_environment(any_ctx):
    reply = run(any_ctx, "env", env=["A=1", "B=two words", "A=2", "NOEQUALS"],
                capture_output=True)
    assert decoded(reply, "out") == b"A=1\nB=two words\n"


def test_path_search_uses_the_path_from_env(any_ctx, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "prog"
    program.write_text("#!/bin/sh\necho prog $0\n")
    program.chmod(0o755)
    reply = run(any_ctx, "prog", env=[f"PATH=/nonexistent:{bin_dir}"], capture_output=True)
    assert decoded(reply, "out") == f"prog {program}\n".encode()
    # Without PATH in env, the agent's PATH is searched.
    assert run(any_ctx, "true", env=["A=1"]) == {"exitcode": 0, "exited": True}


def test_script_without_interpreter_line_runs_through_sh(any_ctx, tmp_path):
    script = tmp_path / "script"
    script.write_text("echo run by a shell $0\n")
    script.chmod(0o755)
    reply = run(any_ctx, str(script), capture_output=True)
    assert decoded(reply, "out") == f"run by a shell {script}\n".encode()


def test_child_inherits_cwd_and_no_descriptors(any_ctx, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    leaked_read, leaked_write = os.pipe()
    os.set_inheritable(leaked_write, True)  # something in the agent left inheritable
    try:
        reply = run(any_ctx, "sh", arg=["-c", "pwd; ls /proc/$$/fd"], capture_output=True)
    finally:
        os.close(leaked_read)
        os.close(leaked_write)
    assert decoded(reply, "out") == f"{tmp_path}\n0\n1\n2\n".encode()


def test_sigpipe_is_back_to_default(any_ctx):
    reply = run(any_ctx, "sh", arg=["-c", "(yes; echo $? >&2) | head -c 3"], capture_output=True)
    assert decoded(reply, "err") == b"141\n"  # 128 + SIGPIPE: killed, not ignored


def test_spawn_failures_use_glibs_message(any_ctx, tmp_path):
    (tmp_path / "plain").write_text("not a program")

    def failure(path, reason):
        return f"Failed to execute child process \u201c{path}\u201d ({reason})"

    assert spawn_error(any_ctx, "/bin/x") == failure("/bin/x", "No such file or directory")
    assert spawn_error(any_ctx, "x-no-such-program") == failure("x-no-such-program",
                                                                 "No such file or directory")
    assert spawn_error(any_ctx, "") == failure("", "No such file or directory")
    assert spawn_error(any_ctx, str(tmp_path)) == failure(str(tmp_path), "Permission denied")
    assert spawn_error(any_ctx, str(tmp_path / "plain")) == failure(str(tmp_path / "plain"),
                                                                     "Permission denied")
    assert spawn_error(any_ctx, "plain", env=[f"PATH={tmp_path}"]) == failure(
        "plain", "Permission denied")
    assert spawn_error(any_ctx, "true", env=["PATH=/nonexistent"]) == failure(
        "true", "No such file or directory")
    assert spawn_error(any_ctx, "x", env=[f"PATH={tmp_path}/plain"]) == failure(
        "x", "Not a directory")


def test_find_program_follows_glib(tmp_path, monkeypatch):
    (tmp_path / "dir").mkdir()
    (tmp_path / "exe").write_text("#!/bin/sh\n")
    (tmp_path / "exe").chmod(0o755)
    path = os.fsencode(tmp_path)
    assert find_program(b"exe", [b"PATH=/nonexistent::" + path]) == (path + b"/exe", 0)
    assert find_program(b"./exe", None) == (b"./exe", 0)  # a slash: no search
    assert find_program(b"dir", [b"PATH=" + path])[1] == 13  # EACCES
    monkeypatch.chdir(tmp_path)
    assert find_program(b"exe", [b"PATH=:/nonexistent"]) == (b"exe", 0)  # empty = cwd
    monkeypatch.delenv("PATH")
    assert find_program(b"sh", [b"A=1"])[0] in (b"/bin/sh", b"/usr/bin/sh")


# -- exec-allow-programs ---------------------------------------------------------------------


@pytest.fixture
def fenced(tmp_path):
    statedir = tmp_path / "state"
    statedir.mkdir()
    config = Config()
    config.exec_allow_programs = [os.path.realpath("/bin/echo")]
    context = Context(config, StateDir(str(statedir)))
    yield context
    wait_for_children(context)
    context.close()


def test_allowed_program_runs_by_name_path_or_link(fenced, tmp_path):
    assert decoded(run(fenced, "echo", arg=["a"], capture_output=True), "out") == b"a\n"
    assert decoded(run(fenced, "/bin/echo", arg=["b"], capture_output=True), "out") == b"b\n"
    (tmp_path / "link").symlink_to(os.path.realpath("/bin/echo"))
    assert decoded(run(fenced, str(tmp_path / "link"), arg=["c"], capture_output=True),
                   "out") == b"c\n"


def test_other_programs_are_refused(fenced, tmp_path, caplog):
    assert spawn_error(fenced, "sh", arg=["-c", "touch x"]) == (
        "Failed to execute child process \u201csh\u201d (Permission denied)")
    (tmp_path / "echo").symlink_to("/bin/sh")
    assert spawn_error(fenced, "echo", env=[f"PATH={tmp_path}"]).endswith("(Permission denied)")
    assert "not in exec-allow-programs" in caplog.text
    assert len(fenced.service(ExecTable)) == 0


# -- the loop, reaping and bounds ---------------------------------------------------------------


def test_the_loop_reaps_children_nobody_asks_about(loop_ctx):
    pid = guest_exec(loop_ctx, "sh", arg=["-c", "echo x"], capture_output=True)["pid"]
    table = loop_ctx.service(ExecTable)
    deadline = time.monotonic() + 10
    record = table._records[pid][0]
    while not (record.wait_status is not None and record.stdout.closed):
        loop_ctx.loop.run_once(0.05)
        assert time.monotonic() < deadline
    assert not os.path.exists(f"/proc/{pid}")  # reaped: not even a zombie
    assert bytes(record.stdout.data) == b"x\n"
    assert record.pidfd is None and not loop_ctx.loop.watching(record.stdout.fd or -1)
    assert guest_exec_status(loop_ctx, pid)["exited"] is True


def test_finished_records_expire(loop_ctx, monkeypatch):
    monkeypatch.setattr(exec_module, "FINISHED_RECORD_TTL", 0.05)
    pid = guest_exec(loop_ctx, "true")["pid"]
    deadline = time.monotonic() + 10
    while len(loop_ctx.service(ExecTable)):
        loop_ctx.loop.run_once(0.05)
        assert time.monotonic() < deadline, "the record did not expire"
    with pytest.raises(CommandError):
        guest_exec_status(loop_ctx, pid)


def wait_reaped(table: ExecTable, pid: int) -> None:
    """Let the child end and be reaped without collecting its status."""
    record = table._records[pid][0]
    deadline = time.monotonic() + 10
    while not record.exited:
        table._refresh(record)
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_finished_records_are_bounded_in_number_and_bytes(ctx, monkeypatch):
    monkeypatch.setattr(exec_module, "MAX_FINISHED_RECORDS", 2)
    table = ctx.service(ExecTable)
    pids = [guest_exec(ctx, "true")["pid"] for _ in range(4)]
    for pid in pids:
        wait_reaped(table, pid)
    guest_exec(ctx, "true")
    remaining = [pid for pid in pids if pid in table._records]
    assert remaining == pids[2:]
    monkeypatch.setattr(exec_module, "FINISHED_OUTPUT_BUDGET", 10)
    pid = guest_exec(ctx, "head", arg=["-c", "100", "/dev/zero"], capture_output=True)["pid"]
    finish(ctx, pid)  # collected normally: the budget only drops uncollected output
    big = guest_exec(ctx, "head", arg=["-c", "100", "/dev/zero"], capture_output=True)["pid"]
    wait_reaped(table, big)
    guest_exec(ctx, "true")
    assert big not in table._records


def test_running_children_are_never_dropped(ctx, monkeypatch):
    monkeypatch.setattr(exec_module, "MAX_FINISHED_RECORDS", 0)
    pid = guest_exec(ctx, "sleep", arg=["5"])["pid"]
    try:
        guest_exec(ctx, "true")
        assert guest_exec_status(ctx, pid) == {"exited": False}
    finally:
        os.kill(pid, signal.SIGKILL)
    assert finish(ctx, pid) == {"signal": 9, "exited": True}


def test_close_releases_descriptors_and_leaves_no_zombie(tmp_path):
    statedir = tmp_path / "state"
    statedir.mkdir()
    loop = Loop()
    context = Context(Config(), StateDir(str(statedir)), loop)
    before = len(os.listdir("/proc/self/fd"))
    pid = guest_exec(context, "sh", arg=["-c", "echo done"], capture_output=True,
                     input_data="")["pid"]
    time.sleep(0.2)
    context.close()
    loop.close()
    assert is_zombie_or_gone(pid) and not os.path.exists(f"/proc/{pid}")
    assert len(os.listdir("/proc/self/fd")) <= before - 1  # the loop's epoll fd went too
