# c3-render: one image for the API, the worker and the dev node. Python packages come from the lock files
# (exact versions with hashes), so the image gets what passed CI.
FROM python:3.11-slim-bookworm

# ffmpeg/ffprobe: audio and video conversion in the worker and the dev node. Debian stable's versions are
# not pinned: its security updates replace them (hadolint DL3008 is switched off in .hadolint.yaml).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# The dev node's engines (Piper, faster-whisper, OpenCV) are included so that `docker compose up` works
# without a Comput3 key; build with --build-arg WITH_DEVNODE=0 for a smaller API/worker-only image.
ARG WITH_DEVNODE=1
COPY requirements.txt requirements-devnode.txt ./
RUN lock=requirements.txt \
 && if [ "$WITH_DEVNODE" = "1" ]; then lock=requirements-devnode.txt; fi \
 && pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps -r "$lock" \
 && pip check

COPY pyproject.toml README.md ./
COPY *.py ./
COPY devnode ./devnode
COPY dashboard_assets ./dashboard_assets
COPY lua ./lua
COPY scripts ./scripts
# the package install adds the console scripts (c3-render-worker, c3-render-devnode ...); code runs from /app
RUN pip install --no-cache-dir --disable-pip-version-check --no-deps . \
 && useradd --create-home --uid 10001 --user-group c3render \
 && mkdir -p /app/var && chown -R 10001:10001 /app/var
USER 10001

ENV PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
EXPOSE 8000
# health checks are set per service in docker-compose.yml (one image runs the API, the worker and the dev node)
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "2", "--worker-class", "gthread", "--threads", "64", "--graceful-timeout", "30", "--access-logfile", "-", "app:create_app()"]
