# TornCat SSE: a small image that runs torncat_sse.py against DATABASE_URL.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin torncat

# The userscript too: the server serves it at /torn-war-caller.user.js, pointed at itself.
COPY torncat_sse.py trigger.sql torn-war-caller.user.js ./

USER 10001
# Render sets $PORT; the server reads it (default 3000) and binds 0.0.0.0.
ENV HOST=0.0.0.0 PORT=3000
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '3000'), timeout=4)"]
CMD ["python", "torncat_sse.py"]
