#!/usr/bin/env bash
# System packages for the GigE Vision camera tests (Debian/Ubuntu; root or passwordless sudo).
#   aravis-tools          arv-fake-gv-camera-0.8, the GigE Vision camera simulator the tests start on 127.0.0.1
#   gir1.2-aravis-0.8     the Aravis introspection data used through PyGObject (gi.repository.Aravis)
#   libgirepository1.0-dev, libcairo2-dev, pkg-config: what `pip install "PyGObject<3.51"` needs to build;
#   `make venv` installs PyGObject into .venv when these are present (run this script first).
# Lean on purpose: no recommends, one apt-get update. Idempotent: does nothing when all is installed.
set -euo pipefail

PACKAGES=(aravis-tools gir1.2-aravis-0.8 libgirepository1.0-dev libcairo2-dev pkg-config)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep "install ok installed" >/dev/null || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "ci_camera_setup: all camera packages present"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
echo "ci_camera_setup: installing ${missing[*]}"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
command -v arv-fake-gv-camera-0.8 >/dev/null
echo "ci_camera_setup: done"
