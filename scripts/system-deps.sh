#!/usr/bin/env bash
# Installs the system libraries Darkbloom and its tests use, where this machine lets us.
# Debian/Ubuntu as root: apt-get. macOS: nothing needed (Metal MLX, no OpenBLAS).
# Elsewhere: one line saying what to install by hand. Never fails the build by itself.
set -u
packages=(libopenblas0-pthread g++ libgmp-dev iptables iproute2 chromium postgresql)
case "$(uname -s)" in
  Darwin) exit 0 ;;
esac
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: install OpenBLAS (pthread), g++ (MLX compiles its CPU kernels with it), GMP headers, iptables, Chromium, PostgreSQL and Node.js with your package manager" >&2
  exit 0
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node.js may come from another repository (with npm inside it): judge by the command.
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "note: as root (or with sudo) run: apt-get install ${missing[*]}" >&2
  exit 0
fi
echo "installing system packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
  || echo "note: apt-get could not install ${missing[*]}; the tests that need them will skip" >&2
exit 0
