"""Generic helpers with no knowledge of diffusion: configs, logging, name lookup, URLs with a local cache.

Modelled on NVlabs/edm `dnnlib/util.py` (same names and call conventions), rewritten without the
S3, torch and torchvision dependencies: importing this module needs only the standard library;
`requests` is imported on the first http(s) download.
"""

import builtins
import contextlib
import glob
import hashlib
import importlib
import io
import os
import re
import sys
import tempfile
import time
import types
import urllib.parse
import urllib.request
from typing import Any, Optional, Tuple

# ----------------------------------------------------------------------------
# Configs.


class EasyDict(dict):
    """A dict whose items can also be read and written as attributes (`cfg.lr` == `cfg['lr']`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


# ----------------------------------------------------------------------------
# Logging.


class _TeeStream:
    """Writes to an original stream and to the logger's file; everything else is the original stream's."""

    def __init__(self, logger: "Logger", stream):
        self._logger = logger
        self._stream = stream

    def write(self, text: str) -> int:
        self._logger.write_file(text)
        self._stream.write(text)
        if self._logger.should_flush:
            self._stream.flush()
        return len(text)

    def flush(self) -> None:
        self._logger._flush_file()
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        # isatty(), encoding, fileno(), ... are asked of the terminal stream, as libraries expect.
        return getattr(self._stream, name)


class Logger:
    """Tee `sys.stdout` and `sys.stderr` into a log file while still printing them (EDM's `dnnlib.util.Logger`).

    Use as a context manager or call `close()`, which restores the original streams and closes the file.
    With `file_name=None` nothing is written to disk, but the streams are still wrapped (and restored).
    """

    def __init__(self, file_name: Optional[str] = None, file_mode: str = 'a', should_flush: bool = True):
        if file_mode not in ('a', 'w', 'at', 'wt'):
            raise ValueError(f"Logger file_mode must be 'a' or 'w', got {file_mode!r}")
        self.file = open(file_name, file_mode, encoding='utf-8') if file_name is not None else None
        self.should_flush = should_flush
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        sys.stdout = _TeeStream(self, self.stdout)
        sys.stderr = _TeeStream(self, self.stderr)

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self.close()

    def write_file(self, text: str) -> None:
        """Write `text` to the log file only (not to the terminal)."""
        if self.file is not None and text:
            self.file.write(text)
            if self.should_flush:
                self.file.flush()

    def _flush_file(self) -> None:
        if self.file is not None:
            self.file.flush()

    def write(self, text: str) -> int:
        """Write `text` to the log file and the original stdout."""
        self.write_file(text)
        self.stdout.write(text)
        if self.should_flush:
            self.stdout.flush()
        return len(text)

    def flush(self) -> None:
        self._flush_file()
        self.stdout.flush()

    def close(self) -> None:
        """Flush, restore the original stdout/stderr (if still ours) and close the file. Safe to call twice."""
        if isinstance(sys.stdout, _TeeStream) and sys.stdout._logger is self:
            sys.stdout = self.stdout
        if isinstance(sys.stderr, _TeeStream) and sys.stderr._logger is self:
            sys.stderr = self.stderr
        self.stdout.flush()
        if self.file is not None:
            self.file.close()
            self.file = None


# ----------------------------------------------------------------------------
# Cache directory.

_dnnlib_cache_dir: Optional[str] = None


def set_cache_dir(path: Optional[str]) -> None:
    """Override the cache directory for this process (None goes back to the default)."""
    global _dnnlib_cache_dir
    _dnnlib_cache_dir = path


def make_cache_dir_path(*paths: str) -> str:
    """Path inside the cache: `set_cache_dir()` value, else `$DNNLIB_CACHE_DIR`, else `~/.cache/dnnlib`."""
    if _dnnlib_cache_dir is not None:
        return os.path.join(_dnnlib_cache_dir, *paths)
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    home = os.path.expanduser('~')
    if home == '~':  # no HOME: fall back to the temp dir rather than a relative './~'.
        return os.path.join(tempfile.gettempdir(), '.cache', 'dnnlib', *paths)
    return os.path.join(home, '.cache', 'dnnlib', *paths)


# ----------------------------------------------------------------------------
# Formatting.


def format_time(seconds: float) -> str:
    """Human-readable duration: '42s', '3m 07s', '2h 03m 07s', '1d 02h 03m'."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h {(s // 60) % 60:02d}m'


# ----------------------------------------------------------------------------
# Objects by name ("package.module.attr.attr").


def get_module_from_obj_name(obj_name: str) -> Tuple[types.ModuleType, str]:
    """Split a dotted name into (imported module, remaining attribute path).

    Tries the longest importable module prefix first. A single-part name is looked up in `builtins`.
    Raises ImportError when no prefix is importable; an ImportError raised *inside* an existing module
    (a missing dependency) propagates unchanged.
    """
    if not isinstance(obj_name, str) or not obj_name or obj_name.startswith('.') or '..' in obj_name:
        raise ValueError(f'Expected a dotted name like "package.module.Name", got {obj_name!r}')
    parts = obj_name.split('.')
    if len(parts) == 1:
        return builtins, obj_name
    for i in range(len(parts) - 1, 0, -1):
        module_name = '.'.join(parts[:i])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Only "this prefix does not exist" means: try a shorter prefix.
            missing = err.name or ''
            if missing == module_name or module_name.startswith(missing + '.'):
                continue
            raise
        return module, '.'.join(parts[i:])
    raise ImportError(f'Cannot resolve {obj_name!r}: no module named {parts[0]!r}')


def get_obj_from_module(module: types.ModuleType, obj_name: str) -> Any:
    """Follow a dotted attribute path inside a module (submodules are imported on the way)."""
    obj = module
    walked = module.__name__
    for part in obj_name.split('.'):
        if not hasattr(obj, part) and isinstance(obj, types.ModuleType):
            try:
                importlib.import_module(f'{obj.__name__}.{part}')
            except ModuleNotFoundError as err:
                if err.name != f'{obj.__name__}.{part}':  # A dependency of that submodule is missing.
                    raise
        if not hasattr(obj, part):
            raise AttributeError(f'Cannot resolve {module.__name__}.{obj_name}: {walked!r} has no attribute {part!r}')
        obj = getattr(obj, part)
        walked = f'{walked}.{part}'
    return obj


def get_obj_by_name(name: str) -> Any:
    """The Python object named by a fully qualified dotted name, e.g. 'collections.OrderedDict'."""
    module, obj_name = get_module_from_obj_name(name)
    return get_obj_from_module(module, obj_name)


def call_func_by_name(*args, func_name: Optional[str] = None, **kwargs) -> Any:
    """Call the function (or class) named `func_name` with the given arguments."""
    if func_name is None:
        raise ValueError('call_func_by_name() needs func_name="package.module.function"')
    func = get_obj_by_name(func_name)
    if not callable(func):
        raise TypeError(f'{func_name!r} names a {type(func).__name__}, which is not callable')
    return func(*args, **kwargs)


def construct_class_by_name(*args, class_name: Optional[str] = None, **kwargs) -> Any:
    """Instantiate the class named `class_name`, e.g. construct_class_by_name(class_name='training.loss.EDMLoss')."""
    if class_name is None:
        raise ValueError('construct_class_by_name() needs class_name="package.module.Class"')
    return call_func_by_name(*args, func_name=class_name, **kwargs)


# ----------------------------------------------------------------------------
# Files and URLs.


def _default_file_mode() -> int:
    # The only portable way to read the umask is to set it and put it back; done once per process.
    global _FILE_MODE
    if _FILE_MODE is None:
        umask = os.umask(0o022)
        os.umask(umask)
        _FILE_MODE = 0o666 & ~umask
    return _FILE_MODE


_FILE_MODE: Optional[int] = None


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb', encoding: Optional[str] = None):
    """Write a file so that readers see either the old file or the complete new one, never a partial one.

    Writes to a temporary file in the same directory, fsyncs it and `os.replace`s it over `path`.
    If the block raises, the temporary file is removed and an existing `path` is left untouched.
    The new file gets the old file's permissions, or the usual umask-based ones.
    """
    if mode not in ('w', 'wb', 'wt', 'w+', 'wb+', 'w+b'):
        raise ValueError(f"atomic_write mode must be a write mode ('wb' or 'w'), got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    try:
        with os.fdopen(fd, mode, encoding=encoding if 'b' not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        file_mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else _default_file_mode()
        os.chmod(tmp_path, file_mode)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise
    # Make the rename itself durable; not every platform can open a directory.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


_TEMPORARY_RE = re.compile(r'^\..+\.[A-Za-z0-9_]{6,}\.tmp$')  # what atomic_write's mkstemp names look like


def remove_stale_temporaries(directory: str) -> list:
    """Delete the temporary files a killed `atomic_write` left in `directory`; returns their names.
    Call it only while holding the directory's lock (`directory_lock`): a live writer's file would go too."""
    removed = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if _TEMPORARY_RE.match(name) and os.path.isfile(os.path.join(directory, name)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))
                removed.append(name)
    return removed


@contextlib.contextmanager
def directory_lock(directory: str):
    """Hold an exclusive lock on `directory` (an advisory `flock` on its `.lock` file) for the block.

    Another process holding it is a ValueError naming the directory. The kernel releases the lock when the
    holder exits, killed or not, so a stale lock never blocks a later run."""
    import fcntl
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, '.lock')
    with open(path, 'a') as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f'{directory} is in use by another process (it holds {path}); wait for that run to '
                             'finish or choose another output directory') from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def is_url(obj: Any, allow_file_urls: bool = False) -> bool:
    """True for 'scheme://host/...' strings (http, https, ...); 'file://' URLs only when allowed."""
    if not isinstance(obj, str) or '://' not in obj:
        return False
    parsed = urllib.parse.urlparse(obj)
    if not parsed.scheme:
        return False
    if parsed.scheme == 'file':
        return allow_file_urls
    return bool(parsed.netloc)


def _file_url_to_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ('', 'localhost'):
        raise ValueError(f'Only local file:// URLs are supported, got {url!r}')
    return urllib.request.url2pathname(parsed.path)


def url_cache_path(url: str, cache_dir: Optional[str] = None) -> str:
    """Where `open_url` keeps (or expects, for a copy made by hand) the download of `url`."""
    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    name = os.path.basename(urllib.parse.urlparse(url).path) or 'download'
    safe_name = re.sub(r'[^0-9a-zA-Z._-]', '_', name)[:128]
    return os.path.join(cache_dir, f'{url_md5}_{safe_name}')


def _download(url: str, dest, num_attempts: int, verbose: bool) -> None:
    """Stream `url` into the binary file object `dest`, retrying connection errors and 5xx answers."""
    import requests  # Imported here so that `dnnlib` itself stays dependency-free.

    last_error: Optional[BaseException] = None
    reason = ''
    for attempt in range(num_attempts):
        if attempt > 0:
            time.sleep(min(2.0 ** attempt, 10.0))
            dest.seek(0)
            dest.truncate()
        try:
            with requests.get(url, stream=True, timeout=30) as res:
                if 400 <= res.status_code < 500:  # The URL is wrong; retrying will not help.
                    raise OSError(f'HTTP {res.status_code}')
                res.raise_for_status()
                for chunk in res.iter_content(chunk_size=1 << 20):
                    dest.write(chunk)
            if verbose:
                print(f'Downloaded {url}', file=sys.stderr, flush=True)
            return
        except requests.ConnectionError as err:
            last_error, reason = err, 'cannot connect'
        except requests.Timeout as err:
            last_error, reason = err, 'timed out'
        except requests.RequestException as err:
            last_error, reason = err, str(err)
        except OSError as err:
            last_error, reason = err, str(err)
            break
    raise OSError(f'{reason} after {attempt + 1} attempt(s)'.replace('\n', ' ')) from last_error


def open_url(url: str, cache_dir: Optional[str] = None, num_attempts: int = 3, verbose: bool = True,
             return_filename: bool = False, cache: bool = True) -> Any:
    """Open a local path, a file:// URL or an http(s) URL for binary reading (EDM's `open_url`, no S3).

    http(s) downloads go to `{cache_dir}/{md5(url)}_{file name}` (default cache:
    `make_cache_dir_path('downloads')`, i.e. `$DNNLIB_CACHE_DIR/downloads` or `~/.cache/dnnlib/downloads`),
    written atomically; a file already there is used without touching the network, so copying it there
    by hand works offline. With `return_filename=True` the local path is returned instead of a file object
    (needs a local path or `cache=True`). With `cache=False` the download is returned as a BytesIO.
    """
    if not isinstance(url, (str, os.PathLike)):
        raise TypeError(f'open_url expects a path or URL string, got {type(url).__name__}')
    url = os.fspath(url)
    if num_attempts < 1:
        raise ValueError(f'num_attempts must be >= 1, got {num_attempts}')

    if not is_url(url, allow_file_urls=True):
        if '://' in url:
            scheme = url.split('://', 1)[0]
            raise ValueError(f'Unsupported URL scheme {scheme!r} in {url!r}; use http(s)://, file:// or a local path')
        return _open_local(url, return_filename)
    if url.startswith('file://'):
        return _open_local(_file_url_to_path(url), return_filename)
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ('http', 'https'):
        raise ValueError(f'Unsupported URL scheme {scheme!r} in {url!r}; use http(s)://, file:// or a local path')
    if return_filename and not cache:
        raise ValueError('open_url(return_filename=True) needs cache=True: an uncached download has no file name')

    cache_path = url_cache_path(url, cache_dir)
    if cache:
        if os.path.isfile(cache_path):
            return cache_path if return_filename else open(cache_path, 'rb')
        # Copies cached under another file name by older versions (same md5 prefix) are reused too.
        prefix = os.path.basename(cache_path).split('_', 1)[0]
        found = sorted(glob.glob(os.path.join(glob.escape(os.path.dirname(cache_path)), prefix + '_*')))
        found = [p for p in found if not os.path.basename(p).startswith('.')]
        if found:
            return found[0] if return_filename else open(found[0], 'rb')

    if verbose:
        print(f'Downloading {url} ...', file=sys.stderr, flush=True)
    hint = f'copy the file by hand to {cache_path} or pass a local path instead'
    try:
        if not cache:
            buffer = io.BytesIO()
            _download(url, buffer, num_attempts, verbose)
            buffer.seek(0)
            return buffer
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        with atomic_write(cache_path, 'wb') as f:
            _download(url, f, num_attempts, verbose)
    except OSError as err:
        raise OSError(f'Could not download {url} ({err}); {hint}') from err
    return cache_path if return_filename else open(cache_path, 'rb')


def _open_local(path: str, return_filename: bool) -> Any:
    if not os.path.isfile(path):
        what = 'is a directory, not a file' if os.path.isdir(path) else 'does not exist'
        raise FileNotFoundError(f'{path} {what}')
    return path if return_filename else open(path, 'rb')
