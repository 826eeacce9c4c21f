#!/usr/bin/env bash
# Build FlashInfer on the GPU machine from the sdist carried in .whl/ (no network there): its kernels are
# JIT-compiled on first use. Source this after the wheels are installed into /tmp/site.
pip_target=/tmp/site
if ! python3 -c "import flashinfer" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir --target "$pip_target" .whl/flashinfer_python-*.tar.gz \
    || echo "flashinfer: install failed"
fi
python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" || echo "flashinfer: import failed"
