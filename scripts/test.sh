#!/usr/bin/env bash
# Runs the whole test suite (library, MRML-level Slicer logic, worker, CLI, torchrun DDP).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" "test"
exec python -m pytest Testing -q "$@"
