#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver for the demo's browser test (tests/test_demo_app.py), when they are missing and
# apt-get can install them (as root), once; its time is the download's. Anywhere else the browser test is skipped.
# Only scripts/test.sh calls it. Set STEP_BROWSER_TESTS=0 to leave the browser out.
set -euo pipefail
if [ "${STEP_BROWSER_TESTS:-1}" = 0 ] || { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "No chromium/chromedriver and no apt-get as root: the demo's browser test will be skipped." >&2
  exit 0
fi
echo "Installing Debian's chromium and chromium-driver for the demo's browser test" >&2
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
    >/dev/null; then
  echo "Could not install chromium: the demo's browser test will be skipped." >&2
fi
