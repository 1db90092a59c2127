# Source at the start of every GPU-machine command (then e.g. `python3 -m hybridize.cli bench kernels --out $OUT`):
# installs the carried wheels (pytest, einops, fla-core; see README 'Benchmarks') into /tmp/site and puts them, the mamba_ssm Triton sources and this repo's src/ on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD/.whl/mamba_site:$PWD/src
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
