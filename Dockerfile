# The MIDOG 2025 Track 2 submission container.
#
# Runs the registered `submission` fold ensemble, baked into the image at /opt/app/model
# (docker/build.sh exports it first), on every stack in
# /input/images/stacked-histopathology-roi-cropouts/ and writes
# /output/multiple-mitotic-figure-classification.json. No network at run time; uses the
# GPU when one is visible (the ensemble of five ConvNeXt-Small needs well under 1 GB of
# the platform's 16 GB), else the CPU.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    MPLCONFIGDIR=/tmp/matplotlib

RUN groupadd -r user && useradd -m --no-log-init -r -g user user
WORKDIR /opt/app

# dependencies first (cached while the code changes), then the code, then the weights
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY analysis analysis
COPY models models
COPY data_tools data_tools
COPY pipelines pipelines
RUN pip install --no-deps .
COPY --chown=user:user docker/model /opt/app/model

USER user
ENTRYPOINT ["python", "-m", "pipelines.predict"]
CMD ["--model", "/opt/app/model", "--input", "/input/images/stacked-histopathology-roi-cropouts", "--output", "/output/multiple-mitotic-figure-classification.json"]
