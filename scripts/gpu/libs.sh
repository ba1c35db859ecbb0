# libs.sh - sourced on the GPU machine: puts the CUDA 13 user-space libraries (cuBLAS, cuRAND,
# NVRTC, cuDNN) of the torch venv's pip packages on LD_LIBRARY_PATH (never a stubs/ folder)
# and checks that the staged binaries resolve them.
VENV=${TORCH_VENV:-/opt/torch/.venv}
dirs=""
for d in "$VENV"/lib/python3*/site-packages/nvidia/*/lib /usr/local/cuda/lib64; do
  case "$d" in *stubs*) continue ;; esac
  [ -d "$d" ] && dirs="$dirs:$d"
done
export LD_LIBRARY_PATH="${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
PY="$VENV/bin/python3"
[ -x "$PY" ] || PY=$(command -v python3)
check_ldd() {
  local nf
  nf=$(ldd "$1" 2>&1 | grep -c 'not found')
  echo "ldd $1: $nf libraries not found"
  [ "$nf" = 0 ] || ldd "$1" | grep 'not found'
}
# The staged binaries: gpu-bin/bundle.tar.xz (from scripts/build-cuda.sh) unpacked once.
BIN=${BIN:-/tmp/rsb-gpu-bin}
if [ ! -x "$BIN/train" ]; then
  mkdir -p "$BIN" && tar -C "$BIN" -xJf gpu-bin/bundle.tar.xz || echo "[FAIL] cannot unpack gpu-bin/bundle.tar.xz (carry gpu-bin)"
fi
# One start-up cache (kernels built for the GPU, cuDNN algorithm choices) for every process of
# the call, so only the first process compiles and searches (trainer::disk_cache).
export RSB_CACHE_DIR=${RSB_CACHE_DIR:-/tmp/rsb-cache}
