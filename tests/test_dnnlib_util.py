"""Tests for dnnlib/util.py: configs, name lookup, open_url (local, file://, http with cache, offline), atomic writes, Logger."""

import collections
import functools
import hashlib
import http.server
import os
import pathlib
import subprocess
import sys
import threading

import pytest

from dnnlib import util

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_does_not_need_torch():
    code = 'import sys, dnnlib, dnnlib.util; sys.exit(1 if "torch" in sys.modules or "requests" in sys.modules else 0)'
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_easydict_attribute_access():
    d = util.EasyDict(a=1)
    d.b = 2
    assert d['b'] == 2 and d.a == 1 and dict(d) == {'a': 1, 'b': 2}
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        d.missing
    with pytest.raises(AttributeError):
        del d.missing


def test_construct_and_call_by_name():
    od = util.construct_class_by_name([('x', 1)], class_name='collections.OrderedDict')
    assert isinstance(od, collections.OrderedDict) and od['x'] == 1
    assert util.call_func_by_name(4, func_name='math.sqrt') == 2.0
    assert util.get_obj_by_name('os.path.join') is os.path.join
    assert util.get_obj_by_name('len') is len
    assert util.get_obj_by_name('xml.etree.ElementTree.Element').__name__ == 'Element'  # Submodule imported on the way.


def test_get_obj_by_name_errors():
    with pytest.raises(ImportError, match='no_such_pkg_xyz'):
        util.get_obj_by_name('no_such_pkg_xyz.thing')
    with pytest.raises(AttributeError, match="'no_such_attr'"):
        util.get_obj_by_name('collections.no_such_attr')
    with pytest.raises(ValueError, match='dotted name'):
        util.get_obj_by_name('')
    with pytest.raises(ValueError, match='class_name'):
        util.construct_class_by_name()
    with pytest.raises(TypeError, match='not callable'):
        util.call_func_by_name(func_name='math.pi')


def test_format_time():
    assert util.format_time(5) == '5s'
    assert util.format_time(3 * 60 + 7) == '3m 07s'
    assert util.format_time(2 * 3600 + 3 * 60 + 7) == '2h 03m 07s'
    assert util.format_time(86400 + 2 * 3600 + 3 * 60) == '1d 02h 03m'


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'env'))
    assert util.make_cache_dir_path('downloads') == str(tmp_path / 'env' / 'downloads')
    util.set_cache_dir(str(tmp_path / 'explicit'))
    try:
        assert util.make_cache_dir_path('a', 'b') == str(tmp_path / 'explicit' / 'a' / 'b')
    finally:
        util.set_cache_dir(None)
    monkeypatch.delenv('DNNLIB_CACHE_DIR')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert util.make_cache_dir_path() == str(tmp_path / 'home' / '.cache' / 'dnnlib')


def test_is_url():
    assert util.is_url('https://example.com/a.pkl')
    assert not util.is_url('/tmp/a.pkl')
    assert not util.is_url('file:///tmp/a.pkl')
    assert util.is_url('file:///tmp/a.pkl', allow_file_urls=True)
    assert not util.is_url(3)


def test_open_url_local_and_file_url(tmp_path):
    path = tmp_path / 'data bin.bin'
    path.write_bytes(b'\x00\x01payload')
    with util.open_url(str(path)) as f:
        assert f.read() == b'\x00\x01payload'
    with util.open_url(path.as_uri()) as f:  # file:// with a percent-encoded space.
        assert f.read() == b'\x00\x01payload'
    assert util.open_url(str(path), return_filename=True) == str(path)
    with pytest.raises(FileNotFoundError, match='nope.pkl'):
        util.open_url(str(tmp_path / 'nope.pkl'))
    with pytest.raises(FileNotFoundError, match='nope.pkl'):
        util.open_url((tmp_path / 'nope.pkl').as_uri())
    with pytest.raises(ValueError, match="'s3'"):
        util.open_url('s3://bucket/key')


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        """Keep the test output free of per-request lines."""


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A local HTTP server in a thread serving tmp_path/'www'; yields (base_url, stop)."""
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost')
    root = tmp_path / 'www'
    root.mkdir()
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopped = []

    def stop():
        if not stopped:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            stopped.append(True)

    yield root, f'http://127.0.0.1:{server.server_address[1]}', stop
    stop()


def test_open_url_http_download_is_cached(http_root, tmp_path):
    root, base, stop = http_root
    payload = os.urandom(3 << 20)  # Larger than one download chunk.
    (root / 'weights.pkl').write_bytes(payload)
    url = f'{base}/weights.pkl'
    cache_dir = tmp_path / 'cache'
    with util.open_url(url, cache_dir=str(cache_dir), verbose=False) as f:
        assert f.read() == payload
    expected = cache_dir / f'{hashlib.md5(url.encode()).hexdigest()}_weights.pkl'
    assert expected.read_bytes() == payload
    assert [p.name for p in cache_dir.iterdir()] == [expected.name]  # No temporary file left behind.

    stop()  # The second call must not touch the network.
    assert util.open_url(url, cache_dir=str(cache_dir), return_filename=True, verbose=False) == str(expected)
    with util.open_url(url, cache_dir=str(cache_dir), verbose=False) as f:
        assert f.read() == payload


def test_open_url_uncached_returns_bytes(http_root):
    root, base, _ = http_root
    (root / 'a.txt').write_bytes(b'hello')
    assert util.open_url(f'{base}/a.txt', cache=False, verbose=False).read() == b'hello'
    with pytest.raises(ValueError, match='cache=True'):
        util.open_url(f'{base}/a.txt', cache=False, return_filename=True)


def test_open_url_offline_message(http_root, tmp_path):
    _, base, stop = http_root
    stop()
    url = f'{base}/inception.pkl'
    cache_dir = tmp_path / 'cache'
    with pytest.raises(OSError) as info:
        util.open_url(url, cache_dir=str(cache_dir), num_attempts=1, verbose=False)
    message = str(info.value)
    assert '\n' not in message
    assert url in message
    assert util.url_cache_path(url, str(cache_dir)) in message
    assert 'local path' in message
    assert not any(cache_dir.iterdir())  # No partial file in the cache.


def test_open_url_http_404_is_not_retried(http_root, tmp_path):
    _, base, _ = http_root
    with pytest.raises(OSError, match='404'):
        util.open_url(f'{base}/missing.pkl', cache_dir=str(tmp_path / 'c'), num_attempts=5, verbose=False)


def test_atomic_write_replaces_or_keeps(tmp_path):
    path = tmp_path / 'state.bin'
    path.write_bytes(b'old')
    os.chmod(path, 0o640)
    with pytest.raises(RuntimeError):
        with util.atomic_write(str(path)) as f:
            f.write(b'partial new content')
            raise RuntimeError('crash mid-write')
    assert path.read_bytes() == b'old'
    assert [p.name for p in tmp_path.iterdir()] == ['state.bin']
    with util.atomic_write(str(path)) as f:
        f.write(b'new')
    assert path.read_bytes() == b'new'
    assert os.stat(path).st_mode & 0o777 == 0o640
    with util.atomic_write(str(tmp_path / 'text.json'), 'w') as f:
        f.write('{"a": 1}')
    assert (tmp_path / 'text.json').read_text() == '{"a": 1}'
    with pytest.raises(ValueError, match="'a'"):
        with util.atomic_write(str(path), 'a') as f:
            f.write(b'never written')


def test_logger_tees_and_restores(tmp_path, capsys):
    log = tmp_path / 'log.txt'
    before_out, before_err = sys.stdout, sys.stderr
    with util.Logger(str(log), file_mode='w'):
        print('to stdout')
        print('to stderr', file=sys.stderr)
    assert sys.stdout is before_out and sys.stderr is before_err
    print('after close')
    captured = capsys.readouterr()
    assert 'to stdout' in captured.out and 'to stderr' in captured.err
    text = log.read_text()
    assert 'to stdout' in text and 'to stderr' in text and 'after close' not in text
    with util.Logger(str(log), file_mode='a'):
        print('second run')
    assert log.read_text().startswith(text) and 'second run' in log.read_text()
