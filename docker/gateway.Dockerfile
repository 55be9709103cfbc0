# The REST gateway: no GPU, no torch (the gateway extra leaves the model's dependencies out).
FROM python:3.11-slim
WORKDIR /opt/lipsync-serve
COPY pyproject.toml README.md ./
COPY lipsync lipsync
COPY gateway gateway
COPY configs configs
RUN pip install --no-cache-dir '.[gateway]'
EXPOSE 8080
ENTRYPOINT ["lipsync-serve", "gateway", "--host", "0.0.0.0", "--port", "8080", "--data-dir", "/data"]
