#!/usr/bin/env bash
# Build liburing as a static, position-independent archive into $PREFIX (default /usr/local),
# for the wheels: cibuildwheel's before-all in the manylinux_2_28 containers, whose AlmaLinux 8
# has none recent enough (the reader needs liburing >= 2.2: io_uring_sqe_set_data64). CMake
# prefers liburing.a, so an installed wheel needs no system liburing; at run time a kernel
# that refuses io_uring gets the thread pool (BundleReader's "auto" engine, with a note).
# Pinned by release tag; set LIBURING_SHA256 to also check the tarball.
set -euo pipefail
VERSION=${LIBURING_VERSION:-2.7}
PREFIX=${PREFIX:-/usr/local}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
curl -fsSL -o liburing.tar.gz \
  "https://github.com/axboe/liburing/archive/refs/tags/liburing-$VERSION.tar.gz"
sha256sum liburing.tar.gz
if [ -n "${LIBURING_SHA256:-}" ]; then echo "$LIBURING_SHA256  liburing.tar.gz" | sha256sum -c -; fi
tar xzf liburing.tar.gz
cd "liburing-liburing-$VERSION"
./configure --prefix="$PREFIX"
# the archive only (no liburing.so for the linker to prefer), with -fPIC: it goes into
# Python extension modules
make -C src -j"$(nproc)" ENABLE_SHARED=0 CFLAGS="-O2 -fPIC"
make -C src install ENABLE_SHARED=0
ls -l "$PREFIX/lib/liburing.a" "$PREFIX/include/liburing.h"
