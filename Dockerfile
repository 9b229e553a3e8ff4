# syntax=docker/dockerfile:1
# Build stage: dependencies first (cached while only the source changes), then nothing else.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Exactly the pinned, hashed versions of requirements.lock (see the README's "Supply chain"): a package whose
# files do not match their recorded hashes, or one the lock does not pin, stops the build.
COPY requirements.lock ./
RUN python -m venv /venv \
    && /venv/bin/pip install --require-hashes -r requirements.lock

# Run stage: the virtualenv, the source, a non-root user, the database on a volume.
FROM python:3.11-slim
ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1 DATABASE_PATH=/data/bot.sqlite3 WEBHOOK_PORT=8080
RUN useradd --create-home --uid 10001 bot && install -d -m 0700 -o bot /data
COPY --from=build /venv /venv
WORKDIR /app
COPY bot ./bot
COPY cogs ./cogs
COPY migrations ./migrations
USER bot
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('WEBHOOK_PORT', '8080'), timeout=4)"
CMD ["python", "-m", "bot"]
