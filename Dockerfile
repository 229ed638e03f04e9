# CPU image:  docker build -t facetrain . && docker run --rm -v $PWD/outputs:/work/outputs facetrain
# Any entry point, from any folder: docker run --rm -v $PWD/outputs:/work/outputs facetrain \
#     facetrain-eval checkpoint=outputs/train/<run>
# GPU variant: build FROM a CUDA runtime image with Python 3.11 (e.g. nvidia/cuda:12.4.1-runtime-
# ubuntu22.04 plus python3.11), install torch from the matching CUDA wheel index first, then run
# with `docker run --gpus all facetrain facetrain-train trainer=gpu`.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# The versions the test suite passed with (scripts/refresh_constraints.py writes them).
COPY constraints.txt /tmp/constraints.txt
# CPU wheels of torch keep the image small: torch==2.14.1 in the constraints admits the CPU
# index's 2.14.1+cpu, which pip prefers; the rest of torch's requirements come from PyPI.
RUN pip install -c /tmp/constraints.txt torch torchvision \
        --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
# The package as a wheel, installed like any user's (not editable): the config tree ships
# inside it, so the sources are removed and every console script runs from any folder.
COPY pyproject.toml README.md /tmp/src/
COPY facetrain /tmp/src/facetrain
COPY configs /tmp/src/configs
RUN pip wheel --no-deps -w /tmp/dist /tmp/src \
    && pip install -c /tmp/constraints.txt /tmp/dist/facetrain-*.whl \
    && rm -rf /tmp/src /tmp/dist

WORKDIR /work
CMD ["facetrain-train"]
