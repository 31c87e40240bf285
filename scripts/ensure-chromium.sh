#!/usr/bin/env bash
# The inspector's browser test (tests/test_inspector.py) drives Debian's chromium through Playwright's
# Python API (`executable_path`); Playwright's own browser download is never used (no internet).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the inspector's browser test" >&2
  (apt-get install -y -q chromium >/dev/null 2>&1) || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)
else
  echo "chromium is not installed (apt-get install chromium): the inspector's browser test will be skipped" >&2
fi
