#!/usr/bin/env bash
# Room in a device call's carry (64 MiB for the working tree and `.device` together): what GPU calls do not need
# moves out of the checkout before the call and back after it.
#   bash bench/carry_room.sh aside [tests] [wheels]
#                                            the committed raw results (docs/perf/2026-*/, docs/perf/*.png) to
#                                            ../.carry-aside/; with `tests` the test suite (serving and bench calls
#                                            do not run it); with `wheels` four of `.device`'s wheels that uvicorn
#                                            does without (h11 and asyncio instead): with flashinfer's kernel cache
#                                            in `.device` (6.5 MB), run 35 needed both
#   bash bench/carry_room.sh back            everything aside back into place
#   bash bench/carry_room.sh size            what a call would carry: the files git tracks or would, and `.device`
# While they are aside `git status` shows them deleted: commit with explicit paths, and do not stash.
set -euo pipefail
cd "$(dirname "$0")/.."
aside=../.carry-aside
case ${1:-size} in
  aside)
    mkdir -p "$aside"
    paths=(docs/perf/2026-* docs/perf/*.png)
    for extra in "${@:2}"; do
      case $extra in
        tests) paths+=(tests) ;;
        wheels) paths+=(.device/wheels/{watchfiles,httptools,websockets,python_dotenv}-*.whl) ;;
        *) echo "carry_room: aside takes tests and wheels, not $extra"; exit 2 ;;
      esac
    done
    for p in "${paths[@]}"; do
      [ -e "$p" ] || continue
      [ -e "$aside/$p" ] && { echo "carry_room: $aside/$p is there already: run 'back' first"; exit 1; }
      mkdir -p "$aside/$(dirname "$p")" && mv "$p" "$aside/$p"
    done
    ;;
  back)
    [ -d "$aside" ] || exit 0
    (cd "$aside" && find . -mindepth 1 \( -path ./tests -o -path './docs/perf/*' -o -path './.device/wheels/*' \) \
       -prune -print) | while read -r p; do
      [ -e "$p" ] && { echo "carry_room: $p is in the checkout and aside: left aside"; continue; }
      mv "$aside/$p" "$p"
    done
    find "$aside" -depth -type d -empty -delete
    ;;
  size) ;;
  *) echo "usage: bash bench/carry_room.sh aside [tests] [wheels] | back | size"; exit 2 ;;
esac
tree=$( (git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null || true) |  # aside: not there
       awk '{s += $1} END {print s + 0}')
device=$(du -sb .device 2>/dev/null | cut -f1)
awk -v t="$tree" -v d="${device:-0}" \
  'BEGIN {printf "carry: %.1f MiB of 64 (tree %.1f, .device %.1f)\n", (t + d) / 1048576, t / 1048576, d / 1048576}'
