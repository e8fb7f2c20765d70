"""Local and gs:// paths through one library: etils.epath, with fsspec/gcsfs behind gs://.

Every path the project reads or writes (data.dir, the workdir, the export, data_prep's --out)
goes through `resolve`, which returns an `epath.Path`; the code then makes the same calls
(`/`, `open`, `exists`, `mkdir`, `replace`, `iterdir`) whatever the path is. Orbax takes the
same `epath.Path` and writes gs:// checkpoints through tensorstore.

Schemes. A plain path (relative, absolute, `~`) is local; `gs://bucket/path` is Google Cloud
Storage. Any other `scheme://` (s3://, foo://, ...) or a one-slash `gs:/bucket` is refused
with `PathError`: it is never taken as a local folder named `s3:`.

Credentials and endpoints, set once per process when the first gs:// path is resolved
(defaults only: a variable the user set is never overwritten):

- `EPATH_USE_TF=false`: epath always uses gcsfs for gs://, never tf.io.gfile, whether or
  not TensorFlow happens to be installed.
- Real GCS: gcsfs authenticates with Application Default Credentials (`token="google_default"`:
  `GOOGLE_APPLICATION_CREDENTIALS`, `gcloud auth application-default login`, or the metadata
  server of a GCE/TPU VM); tensorstore (Orbax's array writer) finds the same credentials itself.
- Emulator: when `STORAGE_EMULATOR_HOST` (e.g. `http://127.0.0.1:9023`) is set, everything
  talks to it and nothing else:
    TENSORSTORE_GCS_HTTP_URL = that URL         tensorstore sends its GCS requests there;
    GOOGLE_AUTH_TOKEN_FOR_TESTING = "emulator"   tensorstore uses this fixed token instead
                                                 of searching for credentials (which would
                                                 look up metadata.google.internal);
    NO_GCE_CHECK = "true"                        google-auth never probes the GCE metadata
                                                 server at 169.254.169.254;
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT = "false"  gcsfs skips its bucket-layout query over
                                                 gRPC to storage.googleapis.com;
    gcsfs token "anon"                           no credential search at all.
  google-cloud-storage (Orbax's bucket-layout check, tensorboardX's gs:// writer) reads
  STORAGE_EMULATOR_HOST itself and then sends no credentials.
  So STORAGE_EMULATOR_HOST must be set before the first gs:// path is used, and gcsfs (which
  reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT on import) must not have been imported before that.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import uuid

import fsspec
from etils import epath
from etils.epath import backend as epath_backend

GCS_SCHEME = "gs"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


class PathError(ValueError):
    """A path the project cannot use (unsupported scheme, missing bucket, no credentials)."""


_configured = False


def _configure_gcs_clients() -> None:
    """Point every GCS client at STORAGE_EMULATOR_HOST if set, else at GCS with ADC (see module doc)."""
    global _configured
    if _configured:
        return
    _configured = True
    os.environ.setdefault("EPATH_USE_TF", "false")
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    gcs_options = fsspec.config.conf.setdefault("gcs", {})
    if emulator and emulator != "default":
        url = emulator if "://" in emulator else f"http://{emulator}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        os.environ.setdefault("NO_GCE_CHECK", "true")
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        gcs_options.setdefault("token", "anon")
    else:
        gcs_options.setdefault("token", "google_default")


def is_gcs(path) -> bool:
    """True for a gs:// path (a string or an epath.Path)."""
    return os.fspath(path).startswith(f"{GCS_SCHEME}://")


def resolve(path) -> epath.Path:
    """The epath.Path for a user's path: local paths made absolute, gs://bucket/... kept.

    PathError for an empty path, a scheme other than gs://, a one-slash `gs:/x`, or a gs://
    path without a valid bucket name.
    """
    text = os.fspath(path).strip() if path is not None else ""
    if not text:
        raise PathError("the path is empty")
    match = _SCHEME.match(text)
    if match is None:
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    scheme = match.group(1)
    if scheme != GCS_SCHEME or not text.startswith(f"{GCS_SCHEME}://"):
        raise PathError(f"{text}: the scheme '{scheme}:' is not supported; use a local path or gs://bucket/path")
    bucket = text[len("gs://"):].split("/", 1)[0]
    if not _BUCKET.match(bucket):
        raise PathError(f"{text}: {bucket!r} is not a valid bucket name; expected gs://bucket/path")
    _configure_gcs_clients()
    return epath.Path(text.rstrip("/") if text.count("/") > 2 else text)


def require_local(path, what: str) -> str:
    """The absolute local path for an output that is written only to local disk; PathError for gs://."""
    resolved = resolve(path)
    if is_gcs(resolved):
        raise PathError(f"{path}: {what} is written to local disk only; give a local path")
    return os.fspath(resolved)


def bucket_of(path) -> str:
    """'bucket' of gs://bucket/path."""
    return os.fspath(path)[len("gs://"):].split("/", 1)[0]


def check_access(path) -> epath.Path:
    """Resolve `path` and, for gs://, check up front that the bucket exists and is reachable.

    Meant to run before anything expensive (compiling, decoding video), so that a typo in a
    bucket name or missing credentials cost one sentence, not a failed run. Local paths are
    only resolved. Returns the epath.Path.
    """
    resolved = resolve(path)
    if not is_gcs(resolved):
        return resolved
    bucket = bucket_of(resolved)
    from google.auth.exceptions import DefaultCredentialsError

    try:
        exists = epath_backend.fsspec_backend.fs(os.fspath(resolved)).exists(bucket)
    except DefaultCredentialsError:
        raise PathError(f"{resolved}: no Google Cloud credentials found; run gcloud auth application-default "
                        f"login, set GOOGLE_APPLICATION_CREDENTIALS=key.json, or set STORAGE_EMULATOR_HOST "
                        f"for an emulator") from None
    except Exception as err:  # gcsfs, google-auth and aiohttp raise many types; all mean "no access"
        where = (f"the emulator at STORAGE_EMULATOR_HOST={os.environ['STORAGE_EMULATOR_HOST']}"
                 if os.environ.get("STORAGE_EMULATOR_HOST") else "Google Cloud Storage")
        raise PathError(f"{resolved}: cannot reach {where} ({_first_line(err)})") from None
    if not exists:
        raise PathError(f"{resolved}: the bucket gs://{bucket} does not exist or these credentials cannot see it")
    return resolved


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def flush_durably(file) -> None:
    """Flush a file opened for writing, and fsync it if it is local. A gs:// object has no
    descriptor: it becomes durable, and visible, when `close()` completes its upload."""
    file.flush()
    try:
        descriptor = file.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is OSError and ValueError
        return
    os.fsync(descriptor)


def atomic_write(path, content: str | bytes) -> None:
    """Write `content` to `path` so that readers see the old file or the new one, never a part.

    Locally: write a hidden temporary beside `path`, fsync it, and `os.replace` it onto `path`
    (an atomic rename within one directory). On GCS an object becomes visible only when its
    upload completes and then replaces the previous object whole, so the content is uploaded
    straight to `path` (a temporary and a rename would cost two more requests for nothing).
    """
    path = resolve(path)
    mode = "wb" if isinstance(content, bytes) else "w"
    if is_gcs(path):
        with path.open(mode) as file:
            file.write(content)
        return
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        with temporary.open(mode) as file:
            file.write(content)
            flush_durably(file)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def move(source, destination) -> None:
    """Move the file `source` onto `destination` in the same store, replacing it whole.

    Locally `os.replace`, an atomic rename. On GCS a server-side copy (the destination object is
    replaced whole when the copy completes), then the source is deleted, through the same gcsfs
    instance epath uses, so its listing cache stays true. (epath's `replace` goes through gcsfs's
    rename, which first tries GCS's moveTo API; emulators answer it with HTTP 501, which gcsfs
    retries for about 30 s before it falls back to the same copy and delete.)
    """
    source, destination = resolve(source), resolve(destination)
    if is_gcs(source) != is_gcs(destination):
        raise PathError(f"cannot move {source} to {destination}: both must be local or both gs://")
    if not is_gcs(source):
        os.replace(source, destination)
        return
    filesystem = epath_backend.fsspec_backend.fs(os.fspath(source))
    filesystem.copy(os.fspath(source), os.fspath(destination))
    filesystem.rm(os.fspath(source))


@contextlib.contextmanager
def local_copy(path):
    """Yields a local file name holding `path`'s bytes: `path` itself when it is local, else a
    temporary download (deleted on exit) for readers that need a real file (PyAV, VRS)."""
    resolved = resolve(path)
    if not is_gcs(resolved):
        yield str(resolved)
        return
    with tempfile.TemporaryDirectory(prefix="primus_local_copy_") as folder:
        local = os.path.join(folder, resolved.name)
        epath_backend.fsspec_backend.fs(os.fspath(resolved)).get(os.fspath(resolved), local)
        yield local
