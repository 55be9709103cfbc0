# The REST gateway. It needs no GPU: CPU torch comes first so the pinned version resolves to it.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/lipsync-serve
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY lipsync lipsync
COPY gateway gateway
COPY configs configs
RUN pip install --no-cache-dir -e .
EXPOSE 8080
ENTRYPOINT ["lipsync-serve", "gateway", "--host", "0.0.0.0", "--port", "8080", "--data-dir", "/data"]
