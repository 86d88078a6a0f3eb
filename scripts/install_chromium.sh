#!/usr/bin/env bash
# Debian's Chromium and its matching chromedriver, for the web-page test (selenium drives them; nothing downloads
# a browser). Installs with apt-get where this runs as root on Debian/Ubuntu; otherwise says why not and exits 1.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[chromium] not installed, and apt-get is not available here: install chromium and chromedriver" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "[chromium] not installed, and installing needs root: sudo apt-get install chromium chromium-driver" >&2
  exit 1
fi
echo "[chromium] installing chromium and chromium-driver with apt-get (about a minute)"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null \
  || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; }
