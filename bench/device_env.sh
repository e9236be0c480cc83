# Sourced by the bench/*.sh scripts on the GPU machine, from the repo root.
# `.device` is `../shared/device/pack.sh` (flashinfer, Ray + Serve, redis) plus, optionally,
# `fi-cache.txz`: flashinfer's compiled kernels (`xz` of the `fi-cache.tar` that `save-cache.sh`
# leaves in $OUT), so a fresh machine does not compile them again.
source .device/setup.sh
if [ ! -f /tmp/fiws/.restored ]; then
  # pip stamps the headers it installs (tvm_ffi, flashinfer's) with the install time, which is newer than
  # the restored kernels' build log, so ninja would rebuild every kernel (~3 min). Age them once.
  find /tmp/site -exec touch -h -d 2000-01-01 {} +
  [ -f .device/fi-cache.txz ] && tar -xJf .device/fi-cache.txz -C /tmp/fiws
  touch /tmp/fiws/.restored
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
