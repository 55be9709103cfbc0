# The official Triton image with this package installed, serving model_repository/ (mounted at /models).
# 25.01 is the first release on Ubuntu 24.04, whose Python 3.12 this package supports (24.xx ship 3.10);
# its Python backend runs our models in the image's own python3.
FROM nvcr.io/nvidia/tritonserver:25.01-py3
WORKDIR /opt/lipsync-serve
COPY pyproject.toml README.md ./
COPY lipsync lipsync
COPY gateway gateway
COPY configs configs
# The model extra (PyPI's Linux torch wheel has CUDA). Installed from this folder, so relative weight
# roots such as checkpoints/ are taken from here.
RUN pip install --no-cache-dir --break-system-packages -e '.[model]'
