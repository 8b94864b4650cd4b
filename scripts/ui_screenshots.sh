#!/usr/bin/env bash
# Re-takes the dashboard screenshots in docs/screenshots/ (linked from README.md): the
# browser suite's screenshot test with a three-node fleet, writing into docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docs/screenshots
TALLY_UI_SCREENSHOTS_DIR="$PWD/docs/screenshots" bash tests/browser/run.sh -k test_screenshots "$@"
