# Sourced by the bench/*.sh scripts on the GPU machine, from the repo root.
# `.device` is `../shared/device/pack.sh` (flashinfer, Ray + Serve, redis) plus, optionally,
# `fi-cache.txz`: flashinfer's compiled kernels (`xz` of the `fi-cache.tar` that `save-cache.sh`
# leaves in $OUT), so a fresh machine does not compile them again.
source .device/setup.sh
[ -f .device/fi-cache.txz ] && tar -xJf .device/fi-cache.txz -C /tmp/fiws
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
