# One image for every component: `module-controller webhook|extender|provider|certs`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY koupleless koupleless
COPY webhook webhook
COPY extender extender
COPY provider provider
COPY certs certs
COPY devcluster devcluster
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
# Non-root, numeric so runAsNonRoot can verify it; the root filesystem is mounted read-only.
USER 65532:65532
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
ENTRYPOINT ["module-controller"]
