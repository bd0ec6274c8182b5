# A CPU stand-in for the Dockerfile's CUDA base image (tests/test_docker.py), made without any image
# registry: DEBIAN_IMAGE is a Debian root file system (debootstrap) imported into Docker, and the
# build context holds the CPU torch wheel that pip resolves on the test machine. Like a runtime
# image of the real base, it has python3 with pip and torch, but no compiler and no Python headers.
ARG DEBIAN_IMAGE=speedrun-test/debian:bookworm
FROM ${DEBIAN_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The test machine's certificate authorities: where its HTTPS traffic is inspected, builds on this
# base reach the package index only if they trust what the machine itself trusts
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
COPY torch-*.whl /tmp/
# hadolint ignore=DL3013
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir /tmp/torch-*.whl \
    && rm /tmp/torch-*.whl
