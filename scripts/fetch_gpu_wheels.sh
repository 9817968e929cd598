#!/usr/bin/env bash
# Run with PyPI access before measuring on a GPU machine that reaches no package registry (and whose image may hold
# an older transformers and no `datasets`). Downloads the wheels step-hf needs there into .whl/, and CamVid into
# .bench_data/camvid (both ignored by git, copied to the GPU machine; CamVid is never committed: research licence).
# Everything copied must fit in 64 MiB, so the training frames are re-encoded as JPEG (quality 95: 22 MB instead of
# 67 MB); the validation frames and all label maps stay lossless, so evaluation sees the real data.
set -euo pipefail
# (tokenizers is not fetched: the GPU image's 0.23.2 satisfies transformers 5.24, and every megabyte counts.)
cd "$(dirname "$0")/.."
mkdir -p .whl .bench_data/camvid/data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl transformers==5.24.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
camvid=../shared/datasets/camvid
cp "$camvid"/README.md "$camvid"/id2label.json .bench_data/camvid/
cp "$camvid"/data/validation-*.parquet .bench_data/camvid/data/
python3 - "$camvid" <<'PY'
import glob, io, sys

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

source = glob.glob(f"{sys.argv[1]}/data/train-*.parquet")[0]
table = pq.read_table(source)
images = []
for cell in table.column("image").to_pylist():
    buffer = io.BytesIO()
    Image.open(io.BytesIO(cell["bytes"])).convert("RGB").save(buffer, format="JPEG", quality=95)
    images.append({"bytes": buffer.getvalue(), "path": cell["path"]})
table = table.set_column(table.schema.get_field_index("image"), "image",
                         pa.array(images, type=table.schema.field("image").type))
pq.write_table(table, ".bench_data/camvid/data/" + source.rsplit("/", 1)[1])
PY
du -sh .whl .bench_data
