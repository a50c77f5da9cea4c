# Sourced by the benchmarks/gpu_*.sh scripts: carried wheels (.whl/, see docs/engine.md)
# installed into /tmp/site, then this tree's src first on PYTHONPATH.
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
