# The service image: non-root, PostgreSQL + Redis given by EUM_DATABASE_URL / EUM_REDIS_URL.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY eum ./eum
COPY ledger ./ledger
COPY rules ./rules
COPY settlement ./settlement
COPY api ./api
RUN pip install -c constraints.txt . && useradd --system --uid 10001 --home /app eum && mkdir -p /app/var && chown eum /app/var
COPY policies ./policies
# Installed, the code lives in site-packages: the embedded default's file goes in /app/var
# (writable by the service's user); production sets EUM_DATABASE_URL to PostgreSQL.
ENV EUM_POLICIES_DIR=/app/policies EUM_DATABASE_URL=sqlite:////app/var/eum.db
USER eum
EXPOSE 8000
# /readyz, not /healthz: it answers 503 while the database is unusable (urlopen raises, exit 1)
HEALTHCHECK --interval=10s --timeout=2s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz').status == 200 else 1)"
CMD ["eum", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
