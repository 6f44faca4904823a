"""Result storage: where finished job outputs go and the URL a client fetches them from.

This module owns putting a result somewhere a client can fetch it (no job logic):

- MinIO / S3 mode (MINIO_ENDPOINT set): the file is uploaded to MINIO_BUCKET under the spec's
  object name ({job_id}.mp3, {job_id}.mp4, {job_id}.txt) and the result URL is a presigned GET,
  valid at most 7 days (the S3 signature limit). With MINIO_PUBLIC_URL the URL is signed for that
  public host; presigning is pure computation (the region is always given to the client, so no
  GetBucketLocation request is made) and never contacts either host.
- Local mode: localfiles.py (OUTPUT_DIR, signed /files links).

`fetch_result` reads a stored result back for a later pipeline step (never through its public URL).
`store_result` is what the worker calls: it names the file (jobspec.RESULT_NAMES) and uploads it with
`upload_with_retry`, which keeps trying a transient failure (full or unwritable disk, S3 unreachable)
with back-off for STORAGE_RETRY_S while the output stays in the work directory. Secrets (S3 keys, the
file URL secret) never appear in exceptions or logs, and errors meant for clients name no server path
(`scrub_paths`).

The disk does not fill up by design: `set_expiry_rule` gives the bucket a lifecycle rule that expires
objects after RESULT_TTL (rounded up to whole days, the S3 unit), localfiles.cleanup_results deletes
expired local files, `cleanup_work_dirs` removes the work directories that killed workers left, and
`free_space_problem` / `wait_for_free_space` check free disk against MIN_FREE_DISK_MB before a job
writes anything (the API's /readyz reports it too).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.error import MinioException, S3Error
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

import config
import localfiles
from config import Settings
from engine_api import pause
from jobspec import RESULT_NAMES
from localfiles import StorageError

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

MAX_PRESIGN_TTL_S = 7 * 24 * 3600  # S3 SigV4 presigned URLs are valid 7 days at most
EXPIRY_RULE_ID = "c3-render-result-expiry"  # the bucket lifecycle rule this service owns
WORK_DIR_MIN_AGE_S = 300  # a finished job's work directory is left alone this long (its worker cleans it)

# An absolute path of two or more parts, not part of a URL or of a path already scrubbed.
_ABSOLUTE_PATH_RE = re.compile(r"(?<![\w:/.~>-])/(?:[\w.@+-]+/)+[\w.@+-]*")



# --- MinIO / S3 ---------------------------------------------------------------------------------


def uses_minio(settings: Settings) -> bool:
    """True when results go to MinIO / S3 (MINIO_ENDPOINT is set)."""
    return bool(settings.minio_endpoint.strip())


def _split_endpoint(value: str, default_secure: bool) -> tuple[str, bool]:
    """'host:port' or 'http(s)://host:port[/]' -> ('host:port', secure); config.split_s3_url's rule, which
    also checks MINIO_ENDPOINT and MINIO_PUBLIC_URL when the settings are loaded."""
    try:
        return config.split_s3_url(value, default_secure)
    except ValueError as exc:
        raise StorageError(f"invalid S3 endpoint: {exc}") from None


def _region(settings: Settings) -> str:
    return settings.minio_region.strip() or Settings.minio_region  # blank: config.py's default


def _http_client() -> urllib3.PoolManager:
    # minio's default pool retries a refused connection 5 times with backoff; keep the failure
    # quick and clear, and the upload read timeout generous.
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10, read=300),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


def _client(settings: Settings, endpoint: str, default_secure: bool) -> Minio:
    host, secure = _split_endpoint(endpoint, default_secure)
    try:
        return Minio(
            host,
            access_key=settings.minio_access_key or None,
            secret_key=settings.minio_secret_key or None,
            secure=secure,
            region=_region(settings),
            http_client=_http_client(),
        )
    except ValueError as exc:
        raise StorageError(
            f"invalid S3 configuration for endpoint {host}: {_redact(str(exc), settings)}"
        ) from None


def _redact(text: str, settings: Settings) -> str:
    for secret in (settings.minio_access_key, settings.minio_secret_key, settings.file_url_secret):
        if secret:
            text = text.replace(secret, "***")
    return text


def _describe(exc: BaseException, settings: Settings) -> str:
    if isinstance(exc, S3Error):
        detail = f"{exc.code}: {exc.message}"
    else:
        detail = f"{type(exc).__name__}: {exc}"
    return _redact(detail, settings)[:500]


def ensure_bucket(settings: Settings) -> None:
    """Make sure results can be stored: create the bucket (MinIO) or the output directory (local)."""
    if not uses_minio(settings):
        try:
            Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create output directory {settings.output_dir}: {exc}") from None
        return
    endpoint = settings.minio_endpoint.strip()
    bucket = settings.minio_bucket
    client = _client(settings, endpoint, settings.minio_secure)
    try:
        if not client.bucket_exists(bucket):
            try:
                client.make_bucket(bucket, location=_region(settings))
                log.info("created bucket %s on %s", bucket, endpoint)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
    except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
        raise StorageError(
            f"cannot use bucket {bucket!r} on S3 endpoint {endpoint}: {_describe(exc, settings)}"
        ) from None
    set_expiry_rule(settings, client)


def expiry_days(settings: Settings) -> int:
    """RESULT_TTL in whole days, rounded up (S3 lifecycle rules count days; at least 1)."""
    return max(1, math.ceil(settings.result_ttl_s / 86400))


def set_expiry_rule(settings: Settings, client: Minio | None = None) -> bool:
    """Give the bucket a lifecycle rule (id EXPIRY_RULE_ID) expiring objects expiry_days() after they
    were written, keeping the bucket's other rules. A server that refuses (no permission, no lifecycle
    support) is logged, not fatal: results then stay until removed by hand. True when the rule is set."""
    bucket = settings.minio_bucket
    client = client or _client(settings, settings.minio_endpoint.strip(), settings.minio_secure)
    rule = Rule(ENABLED, rule_filter=Filter(prefix=""), rule_id=EXPIRY_RULE_ID,
                expiration=Expiration(days=expiry_days(settings)))
    try:
        try:
            current = client.get_bucket_lifecycle(bucket)
        except S3Error as exc:
            if exc.code != "NoSuchLifecycleConfiguration":
                raise
            current = None
        rules = [r for r in (current.rules if current else []) if r.rule_id != EXPIRY_RULE_ID]
        client.set_bucket_lifecycle(bucket, LifecycleConfig(rules + [rule]))
    except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
        log.warning("could not set the expiry rule on bucket %s (%s); results there are kept until "
                    "deleted by hand", bucket, _describe(exc, settings))
        return False
    log.info("bucket %s: objects expire after %d day(s) (RESULT_TTL)", bucket, expiry_days(settings))
    return True


def _presigned_url(settings: Settings, object_name: str, ttl_s: int) -> str:
    """Presigned GET for object_name, for MINIO_PUBLIC_URL when set. Makes no network request:
    the clients have their region set, so minio never asks the server for the bucket location."""
    public = settings.minio_public_url.strip()
    endpoint = public or settings.minio_endpoint.strip()
    client = _client(settings, endpoint, settings.minio_secure)
    expires = timedelta(seconds=max(1, min(int(ttl_s), MAX_PRESIGN_TTL_S)))
    try:
        return client.presigned_get_object(settings.minio_bucket, object_name, expires=expires)
    except (MinioException, ValueError) as exc:
        raise StorageError(
            f"cannot presign {object_name} for {endpoint}: {_describe(exc, settings)}"
        ) from None


def _upload_minio(settings: Settings, path: Path, object_name: str, ttl_s: int) -> str:
    endpoint = settings.minio_endpoint.strip()
    bucket = settings.minio_bucket
    client = _client(settings, endpoint, settings.minio_secure)
    content_type = localfiles.content_type_for(object_name)
    for attempt in (1, 2):
        try:
            client.fput_object(bucket, object_name, str(path), content_type=content_type)
            break
        except S3Error as exc:
            if exc.code == "NoSuchBucket" and attempt == 1:
                ensure_bucket(settings)
                continue
            raise StorageError(
                f"cannot upload {object_name} to bucket {bucket!r} on {endpoint}: {_describe(exc, settings)}"
            ) from None
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise StorageError(
                f"cannot upload {object_name} to bucket {bucket!r} on {endpoint}: {_describe(exc, settings)}"
            ) from None
    log.info("uploaded %s to bucket %s (%s)", object_name, bucket, content_type)
    return _presigned_url(settings, object_name, ttl_s)


# --- the one entry point the worker uses -----------------------------------------------------------


def upload_result(
    settings: Settings, path: Path, object_name: str, file_secret: bytes, ttl_s: int | None = None
) -> str:
    """Store the result file at path under object_name and return the URL a client fetches it from,
    valid ttl_s seconds (default: RESULT_TTL, the life of the job record)."""
    localfiles.check_name(object_name)
    ttl_s = settings.result_ttl_s if ttl_s is None else ttl_s
    if ttl_s < 1:
        raise ValueError("ttl_s must be at least 1 second")
    if uses_minio(settings):
        if ttl_s > MAX_PRESIGN_TTL_S:
            log.info("result URL lifetime capped at 7 days (S3 presign limit), asked %ss", ttl_s)
        return _upload_minio(settings, Path(path), object_name, ttl_s)
    if not file_secret:
        raise ValueError("the file URL secret is empty")
    localfiles.store(settings, Path(path), object_name)
    return localfiles.signed_file_url(settings, object_name, file_secret, ttl_s)


def upload_with_retry(settings: Settings, path: Path, object_name: str, file_secret: bytes,
                      ttl_s: int | None = None, sleep: Callable[[float], None] = time.sleep,
                      should_stop: Callable[[], str | None] | None = None) -> str:
    """upload_result(), retried with back-off (1, 2, 4 ... 15 s) for STORAGE_RETRY_S: a full or
    unwritable disk or an unreachable S3 is often fixed in that time, and the output is kept in the
    work directory meanwhile. The final StorageError says what failed, without server paths. A stop of the
    job (should_stop: its cancel) is seen between the tries: JobStopped, and no more tries."""
    start = time.monotonic()
    delay, waited, tries = 1.0, 0.0, 0
    while True:
        tries += 1
        try:
            return upload_result(settings, path, object_name, file_secret, ttl_s)
        except StorageError as exc:
            if max(time.monotonic() - start, waited) + delay > settings.storage_retry_s:
                raise StorageError(f"could not store the result after {tries} tries: "
                                   f"{scrub_paths(settings, str(exc))}") from None
            log.warning("storing %s failed (%s); retrying in %.0f s", object_name, exc, delay)
        pause(delay, should_stop, sleep)
        waited += delay
        delay = min(delay * 2, 15.0)


def fetch_result(settings: Settings, name: str, dest: Path, *, field: str) -> None:
    """Copy a stored result (an earlier pipeline step's) to dest, read directly from OUTPUT_DIR or the bucket:
    never through its public URL, so no MINIO_PUBLIC_URL or URL_ALLOWLIST is needed for it. StorageError
    (naming the field, no path) when it is gone or unreadable, or larger than MAX_INPUT_BYTES."""
    localfiles.check_name(name)
    if uses_minio(settings):
        client = _client(settings, settings.minio_endpoint.strip(), settings.minio_secure)
        try:
            size = client.stat_object(settings.minio_bucket, name).size or 0
            if size > settings.max_input_bytes:
                raise StorageError(f"{field}: the earlier step's result is larger than MAX_INPUT_BYTES")
            client.fget_object(settings.minio_bucket, name, str(dest))
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise StorageError(f"{field}: the earlier step's result cannot be read from bucket "
                               f"{settings.minio_bucket!r}: {_describe(exc, settings)}") from None
        return
    path = localfiles.local_file_path(settings, name)
    if path is None:
        raise StorageError(f"{field}: the earlier step's result is no longer in the output directory")
    try:
        if path.stat().st_size > settings.max_input_bytes:
            raise StorageError(f"{field}: the earlier step's result is larger than MAX_INPUT_BYTES")
        shutil.copyfile(path, dest)
    except OSError as exc:
        raise StorageError(f"{field}: the earlier step's result cannot be read ({exc.strerror or 'error'})") from None


# --- keeping paths out of errors, and the disk from filling up ---------------------------------------


def store_result(settings: Settings, r: redis.Redis, job_type: str, job_id: str, output: Path | str,
                 work_dir: Path, should_stop: Callable[[], str | None] | None = None) -> dict[str, str]:
    """Upload an engine's output (a media file, or text, kept as {id}.txt too) under the spec's name
    (jobspec.RESULT_NAMES); the fields that record it on the job: result_url, or text."""
    secret = localfiles.file_url_secret(r, settings.file_url_secret)
    if isinstance(output, str):
        text_path = work_dir / f"{job_id}.txt"
        if not text_path.exists():
            text_path.write_text(output, encoding="utf-8")
        upload_with_retry(settings, text_path, f"{job_id}.txt", secret, settings.result_ttl_s,
                          should_stop=should_stop)
        return {"text": output}
    name = RESULT_NAMES[job_type].format(id=job_id)
    return {"result_url": upload_with_retry(settings, Path(output), name, secret, settings.result_ttl_s,
                                            should_stop=should_stop)}


def scrub_paths(settings: Settings, text: str) -> str:
    """text with the server's work and output directory paths replaced by names a client understands."""
    forms: list[tuple[str, str]] = []
    for base, label in ((settings.work_dir, "<work dir>"), (settings.output_dir, "<output dir>")):
        for form in {base, os.path.abspath(base), str(Path(base).resolve())}:
            if form and form not in (".", "/"):
                forms.append((form.rstrip("/"), label))
    for form, label in sorted(forms, key=lambda item: -len(item[0])):
        text = text.replace(form, label)
    return _ABSOLUTE_PATH_RE.sub("<path>", text)  # any other server path (temp files of libraries ...)


def _free_mb(directory: str) -> float:
    path = Path(directory).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / (1024 * 1024)


def free_space_problem(settings: Settings, include_work_dir: bool = True) -> str:
    """'' when the work directory (and OUTPUT_DIR in local mode) have MIN_FREE_DISK_MB free, else what
    is short (no paths). MIN_FREE_DISK_MB=0 turns the check off."""
    if settings.min_free_disk_mb <= 0:
        return ""
    places = [("work directory", settings.work_dir)] if include_work_dir else []
    if not uses_minio(settings):
        places.append(("output directory", settings.output_dir))
    for name, directory in places:
        try:
            free = _free_mb(directory)
        except OSError as exc:
            return f"the {name} cannot be checked ({exc.strerror or 'error'})"
        if free < settings.min_free_disk_mb:
            return (f"the {name} has {free:.0f} MB free, less than MIN_FREE_DISK_MB="
                    f"{settings.min_free_disk_mb}")
    return ""


def wait_for_free_space(settings: Settings, should_stop: Callable[[], str | None] | None = None,
                        sleep: Callable[[float], None] = time.sleep) -> None:
    """Before a job writes inputs and outputs: wait up to STORAGE_RETRY_S for enough free disk, then
    StorageError (the job fails before any GPU time is spent)."""
    start = time.monotonic()
    delay, waited = 1.0, 0.0
    while True:
        problem = free_space_problem(settings)
        if not problem:
            return
        if (should_stop and should_stop()) or max(time.monotonic() - start, waited) + delay > \
                settings.storage_retry_s:
            raise StorageError(f"not enough free disk space to run the job: {problem}")
        log.warning("disk almost full (%s); waiting %.0f s before starting the job", problem, delay)
        sleep(delay)
        waited += delay
        delay = min(delay * 2, 15.0)


def cleanup_work_dirs(settings: Settings, job_is_active: Callable[[str], bool], now: float | None = None) -> int:
    """Remove the work directories (WORK_DIR/<job id>) of jobs that are no longer active (finished,
    expired or unknown) and untouched for WORK_DIR_MIN_AGE_S: what killed workers left behind.
    A queued or running job's directory is kept (it is reused when the job runs again)."""
    now = time.time() if now is None else now
    removed = 0
    try:
        entries = list(os.scandir(settings.work_dir))
    except OSError:
        return 0
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if now - entry.stat(follow_symlinks=False).st_mtime < WORK_DIR_MIN_AGE_S:
                continue
            if job_is_active(entry.name):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
        except OSError:
            continue
    if removed:
        log.info("removed %d leftover work director%s", removed, "y" if removed == 1 else "ies")
    return removed
