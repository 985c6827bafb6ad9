# lungnode: one image for the embedded node (`serve`) and for scaled workers.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LUNGNODE_STORAGE_DIR=/var/lib/lungnode \
    LUNGNODE_DICOM_HOST=0.0.0.0 \
    LUNGNODE_HTTP_HOST=0.0.0.0

RUN useradd --system --create-home --home-dir /opt/lungnode lungnode \
    && mkdir -p /var/lib/lungnode && chown lungnode /var/lib/lungnode

WORKDIR /opt/lungnode
COPY pyproject.toml README.md ./
COPY lungnode ./lungnode
COPY config ./config
COPY models ./models
RUN pip install .

USER lungnode
VOLUME ["/var/lib/lungnode"]
EXPOSE 11112 5000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:5000/api/v1/health', timeout=4).status != 200)"
CMD ["lungnode", "serve"]
