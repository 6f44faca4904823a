"""storage.py: MinIO mode against moto's S3 server (in-process, loopback), and local mode."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import socket
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest
import requests
from conftest import fill_disk
from minio import Minio

import config
import localfiles
import storage

ACCESS_KEY = "AKIATESTSTORAGEKEY01"
SECRET_KEY = "test-secret-key-do-not-leak-0123456789"
FILE_SECRET = b"file-url-secret-for-tests"


@pytest.fixture()
def http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only: never go through a proxy from the environment
    yield session
    session.close()


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def minio_settings(endpoint: str, **changes) -> config.Settings:
    values = dict(
        minio_endpoint=endpoint,
        minio_access_key=ACCESS_KEY,
        minio_secret_key=SECRET_KEY,
        minio_bucket=f"test-{uuid.uuid4().hex[:12]}",
        minio_secure=False,
        minio_region="us-east-1",
        file_url_secret=FILE_SECRET.decode(),
    )
    values.update(changes)
    return dataclasses.replace(config.Settings(), **values)


def local_settings(tmp_path: Path, **changes) -> config.Settings:
    values = dict(output_dir=str(tmp_path / "out"), public_base_url="https://render.example.com")
    values.update(changes)
    return dataclasses.replace(config.Settings(), **values)


def sigv4_query_valid(url: str, secret_key: str) -> bool:
    """Independent check of an S3 SigV4 presigned GET URL (host header only, unsigned payload)."""
    parts = urllib.parse.urlsplit(url)
    params = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    given = dict(params)["X-Amz-Signature"]
    rest = sorted((k, v) for k, v in params if k != "X-Amz-Signature")
    quote = lambda s: urllib.parse.quote(s, safe="-_.~")  # noqa: E731
    canonical_query = "&".join(f"{quote(k)}={quote(v)}" for k, v in rest)
    canonical = "\n".join(
        ["GET", parts.path, canonical_query, f"host:{parts.netloc}", "", "host", "UNSIGNED-PAYLOAD"]
    )
    amz_date = dict(params)["X-Amz-Date"]
    _key_id, date, region, service, terminal = dict(params)["X-Amz-Credential"].split("/")
    scope = f"{date}/{region}/{service}/{terminal}"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (date, region, service, terminal):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given)


# --- names and content types ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.mp3", "audio/mpeg"),
        ("a.mp4", "video/mp4"),
        ("a.txt", "text/plain; charset=utf-8"),
        ("a.jpg", "image/jpeg"),
        ("a.JPG", "image/jpeg"),
        ("a.png", "image/png"),
        ("a.wav", "audio/wav"),
        ("a.json", "application/json"),
        ("a.bin", "application/octet-stream"),
        ("noext", "application/octet-stream"),
    ],
)
def test_content_type_for(name: str, expected: str) -> None:
    assert localfiles.content_type_for(name) == expected


def test_uses_minio(tmp_path: Path) -> None:
    assert not storage.uses_minio(local_settings(tmp_path))
    assert storage.uses_minio(minio_settings("127.0.0.1:9000"))


# --- MinIO mode (moto S3 server) ----------------------------------------------------------------


def test_upload_and_fetch_presigned(s3_endpoint: str, tmp_path: Path, http: requests.Session) -> None:
    settings = minio_settings(s3_endpoint)
    storage.ensure_bucket(settings)
    job_id = str(uuid.uuid4())
    src = tmp_path / "speech.mp3"
    data = b"ID3" + bytes(range(256)) * 40
    src.write_bytes(data)

    url = storage.upload_result(settings, src, f"{job_id}.mp3", FILE_SECRET, ttl_s=3600)

    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "http" and parts.netloc == s3_endpoint
    assert parts.path == f"/{settings.minio_bucket}/{job_id}.mp3"
    query = dict(urllib.parse.parse_qsl(parts.query))
    assert query["X-Amz-Expires"] == "3600"
    assert "/us-east-1/s3/" in query["X-Amz-Credential"]
    assert sigv4_query_valid(url, SECRET_KEY)
    assert SECRET_KEY not in url

    resp = http.get(url, timeout=10)
    assert resp.status_code == 200
    assert resp.content == data
    assert resp.headers["Content-Type"] == "audio/mpeg"


def test_upload_text_content_type(s3_endpoint: str, tmp_path: Path, http: requests.Session) -> None:
    settings = minio_settings(s3_endpoint)
    storage.ensure_bucket(settings)
    src = tmp_path / "out.txt"
    src.write_text("héllo transcript\n", encoding="utf-8")
    url = storage.upload_result(settings, src, "job.txt", FILE_SECRET)
    resp = http.get(url, timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert resp.content.decode("utf-8") == "héllo transcript\n"
    # default lifetime: 7 days, the S3 maximum
    assert dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["X-Amz-Expires"] == "604800"


def test_public_url_host_is_signed(s3_endpoint: str, tmp_path: Path, http: requests.Session) -> None:
    port = s3_endpoint.rsplit(":", 1)[1]
    public_host = f"localhost:{port}"
    settings = minio_settings(s3_endpoint, minio_public_url=f"http://{public_host}")
    storage.ensure_bucket(settings)
    src = tmp_path / "video.mp4"
    data = b"\x00\x00\x00\x18ftypmp42" + b"v" * 5000
    src.write_bytes(data)

    url = storage.upload_result(settings, src, "job-1.mp4", FILE_SECRET, ttl_s=600)

    parts = urllib.parse.urlsplit(url)
    assert parts.netloc == public_host
    assert sigv4_query_valid(url, SECRET_KEY)
    # the host is part of the signature: the same query for the internal host does not verify
    internal = urllib.parse.urlunsplit(parts._replace(netloc=s3_endpoint))
    assert not sigv4_query_valid(internal, SECRET_KEY)

    resp = http.get(url, timeout=10)
    assert resp.status_code == 200
    assert resp.content == data
    assert resp.headers["Content-Type"] == "video/mp4"


def test_public_url_with_scheme_and_trailing_slash(s3_endpoint: str) -> None:
    settings = minio_settings(s3_endpoint, minio_public_url="https://cdn.example.com/")
    url = storage._presigned_url(settings, "x.mp3", 60)
    parts = urllib.parse.urlsplit(url)
    assert (parts.scheme, parts.netloc) == ("https", "cdn.example.com")
    assert sigv4_query_valid(url, SECRET_KEY)


def test_public_url_with_path_is_refused(s3_endpoint: str) -> None:
    settings = minio_settings(s3_endpoint, minio_public_url="https://cdn.example.com/s3")
    with pytest.raises(storage.StorageError, match="cdn.example.com"):
        storage._presigned_url(settings, "x.mp3", 60)


def test_presigning_makes_no_network_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("presigning must not contact the server")

    monkeypatch.setattr(Minio, "_url_open", no_network)
    down = f"127.0.0.1:{closed_port()}"
    for public in ("", f"http://127.0.0.1:{closed_port()}", "https://cdn.example.com"):
        settings = minio_settings(down, minio_public_url=public)
        url = storage._presigned_url(settings, "job.mp3", 120)
        assert sigv4_query_valid(url, SECRET_KEY)


def test_presign_ttl_capped_at_seven_days(s3_endpoint: str) -> None:
    settings = minio_settings(s3_endpoint)
    url = storage._presigned_url(settings, "job.mp3", 30 * 24 * 3600)
    assert dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["X-Amz-Expires"] == "604800"


def test_ensure_bucket_creates_missing_bucket(s3_endpoint: str) -> None:
    settings = minio_settings(s3_endpoint)
    client = Minio(s3_endpoint, ACCESS_KEY, SECRET_KEY, secure=False, region="us-east-1")
    assert not client.bucket_exists(settings.minio_bucket)
    storage.ensure_bucket(settings)
    assert client.bucket_exists(settings.minio_bucket)
    storage.ensure_bucket(settings)  # idempotent
    assert client.bucket_exists(settings.minio_bucket)


def test_upload_creates_missing_bucket(s3_endpoint: str, tmp_path: Path, http: requests.Session) -> None:
    settings = minio_settings(s3_endpoint)  # no ensure_bucket first
    src = tmp_path / "a.mp3"
    src.write_bytes(b"abc")
    url = storage.upload_result(settings, src, "a.mp3", FILE_SECRET)
    assert http.get(url, timeout=10).content == b"abc"


def test_ensure_bucket_endpoint_down() -> None:
    endpoint = f"127.0.0.1:{closed_port()}"
    settings = minio_settings(endpoint, minio_bucket="results-bucket")
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as info:
        storage.ensure_bucket(settings)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert endpoint in message and "results-bucket" in message
    assert ACCESS_KEY not in message and SECRET_KEY not in message
    assert info.value.__cause__ is None  # the low-level error is not chained into logs


def test_upload_endpoint_down_names_no_secret(tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{closed_port()}"
    settings = minio_settings(endpoint)
    src = tmp_path / "a.mp3"
    src.write_bytes(b"abc")
    with pytest.raises(storage.StorageError) as info:
        storage.upload_result(settings, src, "a.mp3", FILE_SECRET)
    message = str(info.value)
    assert endpoint in message and settings.minio_bucket in message
    for secret in (ACCESS_KEY, SECRET_KEY, FILE_SECRET.decode()):
        assert secret not in message
        assert secret not in repr(info.value)


def test_bad_endpoint_is_a_storage_error() -> None:
    settings = minio_settings("ftp://127.0.0.1:1")
    with pytest.raises(storage.StorageError) as info:
        storage.ensure_bucket(settings)
    assert SECRET_KEY not in str(info.value)


def test_minio_mode_rejects_unsafe_object_name(s3_endpoint: str, tmp_path: Path) -> None:
    src = tmp_path / "a.mp3"
    src.write_bytes(b"abc")
    with pytest.raises(ValueError):
        storage.upload_result(minio_settings(s3_endpoint), src, "../a.mp3", FILE_SECRET)


# --- local mode -----------------------------------------------------------------------------------


URL_RE = re.compile(
    r"https://render\.example\.com/files/(?P<name>[^?]+)\?expires=(?P<exp>\d+)&sig=(?P<sig>[0-9a-f]{64})"
)


def test_local_ensure_bucket_creates_output_dir(tmp_path: Path) -> None:
    settings = local_settings(tmp_path)
    storage.ensure_bucket(settings)
    assert Path(settings.output_dir).is_dir()


def test_local_upload_and_signed_url(tmp_path: Path) -> None:
    settings = local_settings(tmp_path)
    src = tmp_path / "speech.mp3"
    src.write_bytes(b"mp3 bytes")
    before = int(time.time())

    url = storage.upload_result(settings, src, "job-1.mp3", FILE_SECRET, ttl_s=3600)

    match = URL_RE.fullmatch(url)
    assert match, url
    assert match["name"] == "job-1.mp3"
    assert before + 3600 <= int(match["exp"]) <= int(time.time()) + 3600
    assert not url.startswith("file:")
    stored = Path(settings.output_dir) / "job-1.mp3"
    assert stored.read_bytes() == b"mp3 bytes"
    assert sorted(p.name for p in Path(settings.output_dir).iterdir()) == ["job-1.mp3"]  # no temp left
    assert localfiles.verify_file_signature("job-1.mp3", match["exp"], match["sig"], FILE_SECRET)
    assert localfiles.local_file_path(settings, "job-1.mp3") == stored.resolve()

    # a second upload under the same name replaces the file
    src.write_bytes(b"new bytes")
    storage.upload_result(settings, src, "job-1.mp3", FILE_SECRET)
    assert stored.read_bytes() == b"new bytes"


def test_local_upload_missing_source(tmp_path: Path) -> None:
    settings = local_settings(tmp_path)
    with pytest.raises(storage.StorageError):
        storage.upload_result(settings, tmp_path / "nope.mp3", "job.mp3", FILE_SECRET)
    assert list(Path(settings.output_dir).iterdir()) == []


def test_local_upload_requires_secret_and_safe_name(tmp_path: Path) -> None:
    settings = local_settings(tmp_path)
    src = tmp_path / "a.txt"
    src.write_text("x")
    with pytest.raises(ValueError):
        storage.upload_result(settings, src, "a.txt", b"")
    for bad in ("../a.txt", "/tmp/a.txt", ".a.txt", "a/b.txt", ""):
        with pytest.raises(ValueError):
            storage.upload_result(settings, src, bad, FILE_SECRET)


def test_signed_file_url_shape(tmp_path: Path) -> None:
    settings = local_settings(tmp_path, public_base_url="http://127.0.0.1:8000/")
    url = localfiles.signed_file_url(settings, "j.txt", b"k", 60, now=1_000_000)
    expected_sig = hmac.new(b"k", b"j.txt\n1000060", hashlib.sha256).hexdigest()
    assert url == f"http://127.0.0.1:8000/files/j.txt?expires=1000060&sig={expected_sig}"
    with pytest.raises(ValueError):
        localfiles.signed_file_url(settings, "j.txt", b"", 60)
    with pytest.raises(ValueError):
        localfiles.signed_file_url(settings, "../j.txt", b"k", 60)


def test_verify_file_signature_cases(tmp_path: Path) -> None:
    settings = local_settings(tmp_path)
    now = 1_700_000_000
    url = localfiles.signed_file_url(settings, "job.mp4", FILE_SECRET, 100, now=now)
    m = URL_RE.fullmatch(url)
    exp, sig = m["exp"], m["sig"]
    verify = localfiles.verify_file_signature

    assert verify("job.mp4", exp, sig, FILE_SECRET, now=now)
    assert verify("job.mp4", exp, sig, FILE_SECRET, now=now + 100)  # last valid second
    assert verify("job.mp4", exp, sig.upper(), FILE_SECRET, now=now)
    # tampered
    assert not verify("job.mp3", exp, sig, FILE_SECRET, now=now)
    assert not verify("job.mp4", str(int(exp) + 1), sig, FILE_SECRET, now=now)
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    assert not verify("job.mp4", exp, flipped, FILE_SECRET, now=now)
    assert not verify("job.mp4", exp, sig, b"other secret", now=now)
    # expired
    assert not verify("job.mp4", exp, sig, FILE_SECRET, now=now + 101)
    # malformed
    for bad_exp, bad_sig in [
        ("", sig),
        ("abc", sig),
        ("-1", sig),
        (" " + exp, sig),
        (exp + ".0", sig),
        ("١٢٣", sig),  # non-ASCII digits
        ("9" * 40, sig),
        (exp, ""),
        (exp, sig[:-1]),
        (exp, sig + "0"),
        (exp, "z" * 64),
    ]:
        assert not verify("job.mp4", bad_exp, bad_sig, FILE_SECRET, now=now), (bad_exp, bad_sig)
    assert not verify("../job.mp4", exp, sig, FILE_SECRET, now=now)
    assert not verify("job.mp4", exp, sig, b"", now=now)
    assert not verify("job.mp4", None, sig, FILE_SECRET, now=now)  # type: ignore[arg-type]


def test_verify_uses_current_time_by_default(tmp_path: Path) -> None:
    settings = local_settings(tmp_path)
    url = localfiles.signed_file_url(settings, "a.mp3", FILE_SECRET, 60)
    m = URL_RE.fullmatch(url)
    assert localfiles.verify_file_signature("a.mp3", m["exp"], m["sig"], FILE_SECRET)
    old = localfiles.signed_file_url(settings, "a.mp3", FILE_SECRET, 60, now=time.time() - 120)
    m = URL_RE.fullmatch(old)
    assert not localfiles.verify_file_signature("a.mp3", m["exp"], m["sig"], FILE_SECRET)


@pytest.mark.parametrize(
    "name",
    ["../x", "/etc/passwd", ".hidden", "a/b", "%2e%2e", "..", ".", "", "a\\b", "a\x00b", "x y", "é.mp3"],
)
def test_local_file_path_refuses(tmp_path: Path, name: str) -> None:
    settings = local_settings(tmp_path)
    out = Path(settings.output_dir)
    (out / "a").mkdir(parents=True)
    (out / "a" / "b").write_text("nested")
    (out / ".hidden").write_text("hidden")
    (tmp_path / "x").write_text("outside")
    assert localfiles.local_file_path(settings, name) is None


def test_local_file_path_found_missing_and_symlink(tmp_path: Path) -> None:
    settings = local_settings(tmp_path)
    out = Path(settings.output_dir)
    out.mkdir(parents=True)
    (out / "job.txt").write_text("hi")
    (tmp_path / "secret.txt").write_text("outside")
    (out / "link.txt").symlink_to(tmp_path / "secret.txt")
    (out / "dir.txt").mkdir()

    assert localfiles.local_file_path(settings, "job.txt") == (out / "job.txt").resolve()
    assert localfiles.local_file_path(settings, "missing.txt") is None
    assert localfiles.local_file_path(settings, "link.txt") is None  # points outside output_dir
    assert localfiles.local_file_path(settings, "dir.txt") is None  # not a file


# --- issue 12: transient failures retried, no server paths, the disk does not fill up ------------------


def test_full_output_dir_is_retried_until_there_is_room(small_disk: Path, tmp_path: Path) -> None:
    """A real full disk (ENOSPC): the upload is retried with back-off and succeeds once room is made;
    the result file is whole."""
    settings = local_settings(tmp_path, output_dir=str(small_disk / "out"), storage_retry_s=30)
    src = tmp_path / "result.mp3"
    src.write_bytes(b"r" * 300_000)
    filler = fill_disk(small_disk)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            filler.unlink()  # the operator frees space while we retry

    url = storage.upload_with_retry(settings, src, "job-9.mp3", FILE_SECRET, 3600, sleep=sleep)
    assert waits == [1.0, 2.0, 4.0]
    assert URL_RE.fullmatch(url)
    assert (small_disk / "out" / "job-9.mp3").read_bytes() == src.read_bytes()
    assert [p.name for p in (small_disk / "out").iterdir()] == ["job-9.mp3"]  # no partial upload left


def test_full_output_dir_final_error_names_no_path(small_disk: Path, tmp_path: Path) -> None:
    settings = local_settings(tmp_path, output_dir=str(small_disk / "out"), storage_retry_s=5)
    src = tmp_path / "result.mp3"
    src.write_bytes(b"r" * 300_000)
    fill_disk(small_disk)
    with pytest.raises(storage.StorageError) as err:
        storage.upload_with_retry(settings, src, "job-9.mp3", FILE_SECRET, 3600, sleep=lambda s: None)
    message = str(err.value)
    assert message.startswith("could not store the result after 3 tries: cannot store job-9.mp3 in the "
                              "output directory (OUTPUT_DIR): no space left"), message
    assert str(small_disk) not in message and "/" not in message.replace("(OUTPUT_DIR)", "")


def test_scrub_paths_replaces_work_and_output_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = local_settings(tmp_path, work_dir="var/work", output_dir=str(tmp_path / "out"))
    text = (f"ffmpeg failed on {tmp_path}/var/work/abc/in.wav and var/work/abc/x; "
            f"cannot write {tmp_path}/out/a.mp3")
    assert storage.scrub_paths(settings, text) == ("ffmpeg failed on <work dir>/abc/in.wav and <work dir>/abc/x; "
                                                   "cannot write <output dir>/a.mp3")
    engine = ("csm failed: OSError: [Errno 28] No space left on device: '/tmp/8575d3/monologue-e9.mp3' -> "
              "'/srv/x/gradio/m.mp3'; fetched https://example.com/a/b.wav and http://h:80/c/d")
    assert storage.scrub_paths(settings, engine) == (
        "csm failed: OSError: [Errno 28] No space left on device: '<path>' -> '<path>'; "
        "fetched https://example.com/a/b.wav and http://h:80/c/d")


def test_cleanup_results_deletes_only_expired_files(tmp_path: Path) -> None:
    settings = local_settings(tmp_path, result_ttl_s=3600)
    out = Path(settings.output_dir)
    out.mkdir()
    now = time.time()
    for name, age in (("old.mp3", 3700), ("fresh.mp3", 100), (".upload-x.tmp", 4000), (".upload-y.tmp", 60)):
        (out / name).write_bytes(b"x")
        os.utime(out / name, (now - age, now - age))
    (out / "subdir").mkdir()
    os.utime(out / "subdir", (now - 10**6, now - 10**6))
    assert localfiles.cleanup_results(settings, now) == 2
    assert sorted(p.name for p in out.iterdir()) == [".upload-y.tmp", "fresh.mp3", "subdir"]
    assert localfiles.cleanup_results(dataclasses.replace(settings, minio_endpoint="s3:9000"), now + 10**6) == 0


def test_cleanup_work_dirs_keeps_active_and_recent(tmp_path: Path) -> None:
    settings = local_settings(tmp_path, work_dir=str(tmp_path / "work"))
    work = Path(settings.work_dir)
    now = time.time()
    for name, age in (("finished", 600), ("running", 600), ("recent", 10)):
        (work / name).mkdir(parents=True)
        (work / name / "in.wav").write_bytes(b"x")
        os.utime(work / name, (now - age, now - age))
    removed = storage.cleanup_work_dirs(settings, lambda name: name == "running", now)
    assert removed == 1
    assert sorted(p.name for p in work.iterdir()) == ["recent", "running"]


def test_free_space_check(tmp_path: Path, small_disk: Path) -> None:
    settings = local_settings(tmp_path, work_dir=str(small_disk / "work"), output_dir=str(tmp_path / "out"),
                              min_free_disk_mb=1)
    assert storage.free_space_problem(settings) == ""
    fill_disk(small_disk)
    problem = storage.free_space_problem(settings)
    assert problem.startswith("the work directory has 0 MB free, less than MIN_FREE_DISK_MB=1"), problem
    with pytest.raises(storage.StorageError, match="not enough free disk space to run the job"):
        storage.wait_for_free_space(dataclasses.replace(settings, storage_retry_s=0))
    assert storage.free_space_problem(dataclasses.replace(settings, min_free_disk_mb=0)) == ""


def test_bucket_gets_an_expiry_rule_and_keeps_other_rules(s3_endpoint: str) -> None:
    """moto's S3 server stores lifecycle configurations; the rule is read back from it."""
    from minio.commonconfig import ENABLED, Filter
    from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

    settings = minio_settings(s3_endpoint, result_ttl_s=3 * 86400 + 1)
    client = Minio(s3_endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False, region="us-east-1")
    client.make_bucket(settings.minio_bucket)
    theirs = Rule(ENABLED, rule_filter=Filter(prefix="logs/"), rule_id="theirs", expiration=Expiration(days=30))
    client.set_bucket_lifecycle(settings.minio_bucket, LifecycleConfig([theirs]))

    storage.ensure_bucket(settings)
    storage.ensure_bucket(settings)  # twice: still one rule of ours

    rules = {rule.rule_id: rule for rule in client.get_bucket_lifecycle(settings.minio_bucket).rules}
    assert sorted(rules) == ["c3-render-result-expiry", "theirs"]
    ours = rules["c3-render-result-expiry"]
    assert ours.expiration.days == 4 and ours.status == ENABLED  # RESULT_TTL rounded up to whole days
    assert rules["theirs"].expiration.days == 30


def test_expiry_rule_refused_is_not_fatal(s3_endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    settings = minio_settings(s3_endpoint)
    assert storage.set_expiry_rule(settings) is False  # the bucket does not exist: NoSuchBucket
    assert "could not set the expiry rule" in caplog.text and SECRET_KEY not in caplog.text
