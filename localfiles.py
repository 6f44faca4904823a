"""Result files in local mode (no MINIO_ENDPOINT): kept in OUTPUT_DIR and served by the API's /files.

A result is copied into OUTPUT_DIR under its spec name (`store`, atomically: a partial copy has a
dot-name `local_file_path` never serves) and reached at {PUBLIC_BASE_URL}/files/{name}?expires=..&sig=..,
an HMAC-SHA256 signature (`signed_file_url`) the API checks with `verify_file_signature` before serving
`local_file_path()`. Never a file:// URL. The secret is FILE_URL_SECRET, or one made once and kept in
Redis (FILE_URL_SECRET_KEY) so that every API process and worker signs alike (`file_url_secret`).
`cleanup_results` deletes files whose links have expired (RESULT_TTL). The name rule of every stored
result (here and in S3) is `valid_name`.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from config import FILE_URL_SECRET_KEY, Settings

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

UPLOAD_TMP_MAX_AGE_S = 3600  # a partial upload (.upload-*.tmp) older than this was cut short
# A stored file's name: one path component, no leading dot, only these characters.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_SIG_RE = re.compile(r"[0-9a-fA-F]{64}")
_EXPIRES_RE = re.compile(r"[0-9]{1,12}")
_CONTENT_TYPES = {
    ".mp3": "audio/mpeg",
    ".mp4": "video/mp4",
    ".txt": "text/plain; charset=utf-8",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".wav": "audio/wav",
    ".json": "application/json",
}


class StorageError(Exception):
    """Result storage is unreachable or refused an operation (message names no secret)."""



# --- names and content types ------------------------------------------------------------------


def content_type_for(name: str) -> str:
    """The Content-Type of a result file, from its extension."""
    return _CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


def valid_name(name: str) -> bool:
    """True when name is a plain file name this module will store or serve."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def check_name(name: str) -> None:
    if not valid_name(name):
        raise ValueError(f"invalid result file name {name!r}")


# --- local files ----------------------------------------------------------------------------------


def store(settings: Settings, path: Path, object_name: str) -> None:
    """Copy a result file into OUTPUT_DIR as object_name (StorageError when the disk refuses)."""
    out_dir = Path(settings.output_dir)
    tmp_name = ""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # The temporary name starts with a dot, so local_file_path() never serves a partial file.
        fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=".upload-", suffix=".tmp")
        with os.fdopen(fd, "wb") as dst, open(path, "rb") as src:
            shutil.copyfileobj(src, dst, 1024 * 1024)
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, out_dir / object_name)
        tmp_name = ""
    except OSError as exc:
        reason = "no space left" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or "error")
        raise StorageError(f"cannot store {object_name} in the output directory (OUTPUT_DIR): "
                           f"{reason}") from None
    finally:
        if tmp_name:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    log.info("stored %s in %s", object_name, out_dir)


def file_url_secret(r: redis.Redis, configured: str) -> bytes:
    """The secret that signs local /files URLs: FILE_URL_SECRET, or one made once and kept in Redis."""
    if configured:
        return configured.encode()
    r.set(FILE_URL_SECRET_KEY, secrets.token_hex(32), nx=True)
    return r.get(FILE_URL_SECRET_KEY).encode()


def _signature(name: str, expires: int, secret: bytes) -> str:
    return hmac.new(secret, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()


def signed_file_url(
    settings: Settings, name: str, secret: bytes, ttl_s: int, now: float | None = None
) -> str:
    """{PUBLIC_BASE_URL}/files/{name}?expires=<unix>&sig=<hex HMAC-SHA256(secret, name\\nexpires)>."""
    check_name(name)
    if not secret:
        raise ValueError("the file URL secret is empty")
    expires = int(time.time() if now is None else now) + int(ttl_s)
    sig = _signature(name, expires, secret)
    base = settings.public_base_url.rstrip("/")
    return f"{base}/files/{name}?expires={expires}&sig={sig}"


def verify_file_signature(name: str, expires: str, sig: str, secret: bytes, now: float | None = None) -> bool:
    """True when sig is the signature of name and expires, and expires has not passed."""
    if not secret or not valid_name(name):
        return False
    if not isinstance(expires, str) or not isinstance(sig, str):
        return False
    if not _EXPIRES_RE.fullmatch(expires) or not _SIG_RE.fullmatch(sig):
        return False
    expires_at = int(expires)
    if expires_at < (time.time() if now is None else now):
        return False
    expected = _signature(name, expires_at, secret)
    return hmac.compare_digest(expected, sig.lower())


def local_file_path(settings: Settings, name: str) -> Path | None:
    """The stored file called name inside OUTPUT_DIR, or None (missing, or not a safe plain name)."""
    if not valid_name(name):
        return None
    base = Path(settings.output_dir).resolve()
    candidate = (base / name).resolve()
    if candidate.parent != base or not candidate.is_file():
        return None
    return candidate


def cleanup_results(settings: Settings, now: float | None = None) -> int:
    """Local mode: delete result files in OUTPUT_DIR whose links expired (written more than RESULT_TTL
    ago) and partial uploads older than an hour. Returns how many files were deleted."""
    if settings.minio_endpoint:
        return 0
    now = time.time() if now is None else now
    removed = 0
    try:
        entries = list(os.scandir(settings.output_dir))
    except OSError:
        return 0
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
            partial = entry.name.startswith(".upload-")
            if (partial and age > UPLOAD_TMP_MAX_AGE_S) or (not partial and age > settings.result_ttl_s):
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    if removed:
        log.info("deleted %d expired result file(s) from the output directory", removed)
    return removed
