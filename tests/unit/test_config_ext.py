"""The extension runtime's settings: runtime-dir, trust-dirs, virtio-ports-dir."""

from __future__ import annotations

import pytest

from qga.cli import main as qga_main
from qga.config import Config, dump, load_file
from qga.errors import ConfigError


def test_defaults_and_dump_stays_quiet_about_them():
    config = Config()
    assert config.runtime_dir == "/run/qga"
    assert config.trust_dirs == []
    assert config.virtio_ports_dir == "/dev/virtio-ports"
    text = dump(config)
    for key in (b"runtime-dir", b"trust-dirs", b"virtio-ports-dir"):
        assert key not in text


def test_keys_of_the_qga_group(tmp_path):
    path = tmp_path / "qga.conf"
    path.write_bytes(b"[qga]\nruntime-dir=/tmp/r\ntrust-dirs=/a,/b\nvirtio-ports-dir=/tmp/p\n")
    config = Config()
    load_file(config, str(path))
    assert (config.runtime_dir, config.trust_dirs, config.virtio_ports_dir) == (
        "/tmp/r", ["/a", "/b"], "/tmp/p")
    assert b"\nruntime-dir=/tmp/r\ntrust-dirs=/a,/b\nvirtio-ports-dir=/tmp/p\n" in dump(config)


@pytest.mark.parametrize("line", [b"runtime-dir=run", b"trust-dirs=/ok,relative",
                                  b"virtio-ports-dir=ports"])
def test_relative_paths_are_refused(tmp_path, line):
    path = tmp_path / "qga.conf"
    path.write_bytes(b"[qga]\n" + line + b"\n")
    with pytest.raises(ConfigError, match=line.split(b"=")[0].decode()):
        load_file(Config(), str(path))


def test_long_options_and_file_lists_add_up(tmp_path, capfdbinary, monkeypatch):
    path = tmp_path / "qga.conf"
    path.write_bytes(b"[qga]\ntrust-dirs=/from-file\n")
    monkeypatch.setenv("QGA_CONF", str(path))
    assert qga_main(["-D", "--runtime-dir=/x/run", "--trust-dirs", "/cli",
                     "--virtio-ports-dir=/x/ports"], prog="qga") == 0
    out = capfdbinary.readouterr().out
    assert b"runtime-dir=/x/run\ntrust-dirs=/from-file,/cli\nvirtio-ports-dir=/x/ports\n" in out
