#!/usr/bin/env bash
# Install the headless browser that tests/inspect/test_html_browser.py drives.
#
# Idempotent: does nothing when /usr/bin/chromium is already there. Otherwise installs
# Debian's `chromium` package with apt-get (needs root, as on CI). It never downloads a
# browser build of its own: Playwright's `playwright install` is not used, the test
# launches the system chromium through `executable_path`.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    echo "install-test-browser: $CHROMIUM already installed ($("$CHROMIUM" --version 2>/dev/null || echo 'version unknown')); nothing to do"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-browser: $CHROMIUM is missing and apt-get is not available;" >&2
    echo "  install Chromium with your system's package manager so that $CHROMIUM exists," >&2
    echo "  or set QKV_SKIP_BROWSER=1 to skip the browser test" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-test-browser: $CHROMIUM is missing and installing it needs root (no sudo found)" >&2
        exit 1
    fi
fi

echo "install-test-browser: $CHROMIUM missing; installing Debian's chromium package with apt-get"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium

if [ ! -x "$CHROMIUM" ]; then
    echo "install-test-browser: apt-get finished but $CHROMIUM is still missing" >&2
    exit 1
fi
echo "install-test-browser: installed $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
