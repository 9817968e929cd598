#!/usr/bin/env bash
# Run HERE (with PyPI access) before a GPU session: the lent GPU machines reach no package registry and their image
# has an older transformers. Downloads the wheels step-hf needs there into .whl/ (ignored by git; carry it), and
# CamVid's validation split into .bench_data/ for the benchmark (ignored by git; never committed: research licence).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .bench_data/camvid/data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl transformers==5.24.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 \
    tokenizers==0.23.3
cp ../shared/datasets/camvid/data/validation-*.parquet .bench_data/camvid/data/
ls -la .whl .bench_data/camvid/data
