# GPU image: the official vLLM OpenAI image plus the AdaRAS plugin and server.
# Build:  docker build -t adaras:gpu .
# Run:    docker run --gpus all -p 8000:8000 -v ~/.cache/adaras:/root/.cache/adaras adaras:gpu
# (CPU variant: deploy/Dockerfile.cpu)
ARG VLLM_IMAGE=vllm/vllm-openai:v0.11.0
FROM ${VLLM_IMAGE}

WORKDIR /opt/adaras
COPY pyproject.toml README.md ./
COPY server ./server
COPY steering_kernels ./steering_kernels
# vLLM and torch come from the base image; install only our package and its light deps.
RUN python3 -m pip install --no-cache-dir -e . triton

ENV ADARAS_CACHE=/root/.cache/adaras
EXPOSE 8000
ENTRYPOINT ["adaras"]
# --enforce-eager: steering does not support CUDA graphs yet (see README, GPU notes).
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--", "--enforce-eager"]
