# Sourced by scripts/gpu_session.sh and scripts/gpu_checks.sh on the GPU machine, from the repository root. The
# machine reaches no registry: newer transformers / huggingface_hub and datasets come as the wheels carried in .whl/
# (scripts/fetch_gpu_wheels.sh), installed once into /tmp/site. A CPU dry run (TINY=1) keeps the installed packages.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HOME=/tmp/hf_home TOKENIZERS_PARALLELISM=false
if [ -z "${TINY:-}" ] && ls .whl/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    touch /tmp/site/.installed
    # A `datasets` that cannot import here (say, an older pyarrow) is removed, so the benchmark reads the parquet
    # files itself; training then fails with the import error in its log.
    PYTHONPATH=/tmp/site python3 -c "import datasets" || rm -rf /tmp/site/datasets /tmp/site/datasets-*
fi
if [ -z "${TINY:-}" ] && [ -f /tmp/site/.installed ]; then
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
