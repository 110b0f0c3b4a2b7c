# A stand-in for python:3.11-slim when no container registry is reachable (scripts/images.sh base):
# Debian bookworm from the Debian archive (debootstrap, imported as DEBIAN_BASE) plus the host's CPython
# 3.11 (cpython.tar: bookworm's own 3.11.2 pickles Enum members in a way the trainer's checkpoint loader
# refuses) and the host's CA bundle, so pip in the builds reaches the package index as the host's pip does.
ARG DEBIAN_BASE=ctrain-debian:bookworm
FROM ${DEBIAN_BASE}
LABEL org.ctrain.standin="python:3.11-slim built from the Debian archive and the host's CPython"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY host-ca-bundle.crt /usr/local/share/ca-certificates/host-ca-bundle.crt
# The runtime libraries CPython's extension modules link against; versions are the bookworm release's.
# hadolint ignore=DL3008
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      ca-certificates libssl3 libffi8 libsqlite3-0 zlib1g libbz2-1.0 liblzma5 libreadline8 libncursesw6 libuuid1 \
 && update-ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
ADD cpython.tar /usr/local/
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PIP_DEFAULT_TIMEOUT=180 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN ldconfig \
 && mkdir -p /usr/local/lib/python3.11/site-packages \
 && ln -s python3.11 /usr/local/bin/python3 && ln -s python3.11 /usr/local/bin/python \
 && python3.11 -m ensurepip --default-pip \
 && rm -rf /root/.cache \
 && python -c "import ssl, sqlite3, ctypes, lzma, bz2, zlib, uuid, decimal, sys; print(sys.version)"
CMD ["python3"]
