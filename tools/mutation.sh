#!/usr/bin/env bash
# Mutation testing outside CI (minutes per module on 2 cores): see tools/mutation.py for what it runs.
#   bash tools/mutation.sh [MODULE ...]   -> benchmarks/results/mutation.md
exec "${PYTHON:-python3}" "$(dirname "$0")/mutation.py" "$@"
