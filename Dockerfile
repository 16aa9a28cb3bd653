# The image every Ray node runs (head and GPU workers; KubeRay and `ray up` alike): a CUDA PyTorch base, this
# package installed non-editable with the `imagen` console script on PATH, and the cluster configs users pass to
# `imagen run` / `imagen train` (cluster/) in the working directory /opt/imagen. See cluster/README.md.
#
#   docker build -t $REGISTRY/imagen-cluster:$TAG --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
#
# BASE_IMAGE: any CUDA PyTorch image with Python >= 3.11; its torch is kept (pyproject asks torch>=2.4).
# INSTALL_EFA=1 adds libfabric and the aws-ofi-nccl plugin (AWS EFA installer, user space only) so NCCL runs over
# EFA on p4d/p5 nodes; without it NCCL falls back to TCP sockets between nodes.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG INSTALL_EFA=0
ARG GIT_COMMIT=unknown
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0 \
    IMAGEN_GIT_COMMIT=${GIT_COMMIT} \
    IMAGEN_CACHE_DIR=/tmp/imagen-cache \
    LD_LIBRARY_PATH=/opt/amazon/efa/lib:/opt/amazon/ofi-nccl/lib:/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH}

# wget: KubeRay's health probes; rsync/openssh-client: the `ray up` launcher; git: DeepSpeed's build metadata.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget curl ca-certificates rsync openssh-client git \
    && if [ "$INSTALL_EFA" = "1" ]; then \
         cd /tmp && curl -fsSL -O https://efa-installer.amazonaws.com/aws-efa-installer-latest.tar.gz \
         && tar -xf aws-efa-installer-latest.tar.gz && cd aws-efa-installer \
         && ./efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify \
         && cd / && rm -rf /tmp/aws-efa-installer*; \
       fi \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/imagen
COPY pyproject.toml README.md ./src/
COPY imagen_core ./src/imagen_core
COPY pipelines ./src/pipelines
COPY jobs ./src/jobs
# Non-editable: the package (with its package data: tiny T5, DeepSpeed JSONs, shipped configs) lands in
# site-packages and the source copy is removed. ray[default] adds the dashboard and job server the head needs
# (`ray job submit`, KubeRay's RayJob); boto3 lets MLflow read and write s3:// artifacts.
RUN python -m pip install ./src "ray[default]==2.60.0" "boto3>=1.34" \
    && rm -rf ./src \
    && imagen --help > /dev/null \
    && python -c "import imagen_core, pipelines, deepspeed, ray; print('imagen', imagen_core.__file__, 'ray', ray.__version__)"

# What users edit and name on the command line (`imagen run cluster/run/paper.toml`), relative to /opt/imagen.
COPY cluster ./cluster
