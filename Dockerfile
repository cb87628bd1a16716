# tunewatch: the CLI, the scheduler and the HTTP API (`tunewatch serve`), with CPU-only torch.
#
#   docker build -t tunewatch .
#   docker run --rm tunewatch --help
#
# GPU users: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 (and a
# matching TORCH_REQUIREMENT).
FROM python:3.11.10-slim-bookworm

ARG TORCH_REQUIREMENT=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the CPU index: torch from PyPI is a multi-GB CUDA build.
RUN pip install "${TORCH_REQUIREMENT}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY monitor ./monitor
COPY tuner ./tuner
COPY migrations ./migrations
# The constraint keeps the torch installed above, whatever a dependency asks for.
RUN echo "${TORCH_REQUIREMENT}" > /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt . \
    && rm -rf /src/build /tmp/torch-constraint.txt

# Run as an unprivileged user; artifacts (registered and tuned models) live in a volume.
RUN useradd --create-home --uid 10001 --user-group tunewatch \
    && mkdir -p /var/lib/tunewatch/artifacts \
    && chown -R tunewatch:tunewatch /var/lib/tunewatch
USER 10001:10001
WORKDIR /var/lib/tunewatch
ENV TUNEWATCH_ARTIFACTS_DIR=/var/lib/tunewatch/artifacts

EXPOSE 8080
ENTRYPOINT ["tunewatch"]
CMD ["--help"]
