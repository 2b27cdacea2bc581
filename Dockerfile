# One image for every bridgepost service; docker-compose.yml starts each with its own command
# (`bridgepost serve subscriptions`, `bridgepost serve mailer`, `bridgepost migrate`).
# Health checks are defined in docker-compose.yml (each service has its own port).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, unprivileged user (numeric ids, so orchestrators can verify runAsNonRoot).
RUN groupadd --system --gid 10001 bridgepost \
    && useradd --system --uid 10001 --gid bridgepost --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin bridgepost

# Only what the package build needs. Templates, locales, taxonomy.toml and the Alembic
# migrations (env.py, script.py.mako, versions/) live inside shared/ and services/ and are
# installed through [tool.setuptools.package-data] in pyproject.toml.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY services/ services/
# Non-editable install into site-packages; the sources are removed so nothing imports from /src.
RUN pip install . && rm -rf /src

# Working directory of the running services; var/ is only used by the SQLite defaults (not in production).
WORKDIR /app
RUN mkdir -p /app/var && chown -R bridgepost:bridgepost /app

USER 10001:10001

EXPOSE 8001 8003
CMD ["bridgepost", "--help"]
