# GPU image: the official vLLM OpenAI image plus the AdaRAS plugin and server.
# Build:  docker build -t adaras:gpu .
# Run:    docker run --gpus all -p 8000:8000 -v adaras-cache:/var/cache/adaras adaras:gpu
# (CPU variant: deploy/Dockerfile.cpu)
# The base image's vLLM must be one the plugin accepts (adaras.engine.plugin.TESTED_VLLM,
# pinned by tests/test_deploy.py).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

WORKDIR /opt/adaras
COPY pyproject.toml README.md ./
COPY server ./server
COPY steering_kernels ./steering_kernels
# vLLM and torch come from the base image; install only our package and its light deps.
RUN python3 -m pip install --no-cache-dir -e . triton

# Run as a non-root user; every cache (models, uploads, compile caches) lives
# under /var/cache/adaras, the one writable path (a volume in compose and k8s).
RUN useradd --uid 10001 --user-group --home-dir /home/adaras --create-home adaras \
    && mkdir -p /var/cache/adaras && chown adaras:adaras /var/cache/adaras
ENV ADARAS_CACHE=/var/cache/adaras \
    XDG_CACHE_HOME=/var/cache/adaras/xdg \
    VLLM_CACHE_ROOT=/var/cache/adaras/vllm \
    TRITON_CACHE_DIR=/var/cache/adaras/triton
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["adaras"]
# --enforce-eager: steering does not support CUDA graphs yet (see README, GPU notes).
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--", "--enforce-eager"]
