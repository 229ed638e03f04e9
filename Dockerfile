# CPU image: docker build -t facetrain . && docker run --rm -v $PWD/outputs:/app/outputs facetrain
# GPU variant: build FROM a CUDA runtime image with Python 3.11 (e.g. nvidia/cuda:12.4.1-runtime-
# ubuntu22.04 plus python3.11), install torch from the matching CUDA wheel index first, then run
# with `docker run --gpus all facetrain python train.py trainer=gpu`.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
# CPU wheels of torch keep the image small; the project itself then installs on top.
RUN pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY facetrain ./facetrain
COPY configs ./configs
COPY train.py ./
RUN pip install -e .

CMD ["python", "train.py"]
