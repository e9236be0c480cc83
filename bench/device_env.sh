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
# flashinfer builds each JIT module with ninja at its default parallelism (cores + 2) unless MAX_JOBS is set.
# `jit-build` builds seven modules at once, four of them prefill attention (bf16 and fp16, sm90 and fa2) of ~10
# heavy sources each: ~40 nvcc processes at once where run 22 ran ~20 (bf16 only), on a 16-core machine whose
# RAM grows as it is used. On 2026-12-04 (21:40 UTC) the first call building the seven ran to its limit and the
# machine stopped answering (cause not known). 5 jobs a module keeps run 22's peak; the CPU work, and so the
# build time on 16 cores, is the same either way.
export MAX_JOBS=${MAX_JOBS:-5}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
# llguidance (structured outputs) is not in .device, which has no room for it under the carry limit; the staged vLLM
# brings it (.vllmB), so after a vLLM staging it is importable by our runs too.
if [ -d /tmp/vsite/llguidance ] && [ ! -e /tmp/site/llguidance ]; then
  cp -r /tmp/vsite/llguidance /tmp/vsite/llguidance-*.dist-info /tmp/site/
fi
