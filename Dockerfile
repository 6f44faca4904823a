# c3-render: one image for the API, the worker and the dev node.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt requirements-devnode.txt ./
# The dev node's engines (Piper, faster-whisper, OpenCV) are installed too so that `docker compose up`
# works without a Comput3 key; build with --build-arg WITH_DEVNODE=0 for a slimmer production image.
ARG WITH_DEVNODE=1
RUN pip install --no-cache-dir -r requirements.txt \
 && if [ "$WITH_DEVNODE" = "1" ]; then pip install --no-cache-dir -r requirements-devnode.txt; fi

COPY . .
RUN useradd --create-home --uid 10001 c3render \
 && mkdir -p /app/var && chown -R c3render /app/var
USER c3render

ENV PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
EXPOSE 8000
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "2", "--worker-class", "gthread", "--threads", "64", "--graceful-timeout", "30", "--access-logfile", "-", "app:create_app()"]
