# bpfsync — `make test` and `make demo` do all set-up themselves on a fresh Debian 12 machine:
# apt packages, the virtualenv, the BPF objects, the generated gRPC code and the kernel for the VM.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE := .cache
CLANG ?= clang
BPF_CFLAGS := -g -O2 -target bpf -D__TARGET_ARCH_x86 -Wall -Wno-unused-function \
	-I$(CACHE)/include -Isrc/bpfsync/bpf
# (file: virtme-ng runs `file` on busybox before every VM boot; a fresh Debian root has none)
APT_PACKAGES := clang llvm libbpf-dev libbpf1 bpftool iproute2 nftables nats-server make \
	python3-venv python3-dev qemu-system-x86 busybox-static kmod procps file
BPF_SRC := $(wildcard src/bpfsync/bpf/*.bpf.c tests/bpf/*.bpf.c examples/*/*.bpf.c)
BPF_OBJ := $(BPF_SRC:.bpf.c=.bpf.o)
BPF_HDR := $(wildcard src/bpfsync/bpf/*.h tests/bpf/*.h examples/*/*.h)
PROTO_DIR := src/bpfsync/transport/_proto
PROTO := $(PROTO_DIR)/bpfsync.proto
PROTO_OUT := $(PROTO_DIR)/bpfsync_pb2.py

.PHONY: all setup deps venv bpf proto bytecode vm-kernel test check unit demo bench fuzz docs clean

all: setup

setup: deps venv bpf proto bytecode

# the package is installed editable: its modules are compiled here, as an install compiles
# them, so that an agent does not compile ~80 modules (0.15 s) at every start; compileall
# skips those whose source did not change
bytecode: proto
	$(PY) -m compileall -q src/bpfsync

# --- system packages ---------------------------------------------------------------------------
deps: $(CACHE)/.apt-done
$(CACHE)/.apt-done:
	@mkdir -p $(CACHE)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing apt packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
	@touch $@

# --- python virtualenv -------------------------------------------------------------------------
venv: $(VENV)/.done
$(VENV)/.done: pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,nats]'
	@touch $@

# --- BPF objects (CO-RE; vmlinux.h from this machine's BTF) ------------------------------------
$(CACHE)/include/vmlinux.h: | deps
	@mkdir -p $(CACHE)/include
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

%.bpf.o: %.bpf.c $(BPF_HDR) $(CACHE)/include/vmlinux.h
	$(CLANG) $(BPF_CFLAGS) -I$(dir $<) -c $< -o $@

bpf: $(BPF_OBJ)

# --- generated gRPC code (never edited by hand) ------------------------------------------------
proto: $(PROTO_OUT)
$(PROTO_OUT): $(PROTO) | venv
	$(PY) -m grpc_tools.protoc -I$(PROTO_DIR) --python_out=$(PROTO_DIR) \
		--grpc_python_out=$(PROTO_DIR) --pyi_out=$(PROTO_DIR) $(PROTO)
	# protoc writes absolute imports; the package imports them relative to itself
	sed -i 's/^import bpfsync_pb2 as/from . import bpfsync_pb2 as/' $(PROTO_DIR)/bpfsync_pb2_grpc.py

# --- kernel for the VM that runs the tracing path (fentry/fexit are refused on the host) -------
vm-kernel: $(CACHE)/vm/.done
$(CACHE)/vm/.done: | deps
	bash tests/vm/fetch-kernel.sh $(CACHE)/vm
	@touch $@

# --- checks ------------------------------------------------------------------------------------
check: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: setup vm-kernel check
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -p no:cacheprovider tests/core $(PYTEST_ARGS)

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m bpfsync.demo

# docs/config.md from the config models' descriptions (a test fails when it is stale)
docs: venv
	$(PY) -m bpfsync.cli.reference --output docs/config.md

# the full fuzz run: >= 100,000 generated frames from an authenticated member against real agents
# (make test runs a quick slice of the same test)
fuzz: setup
	BPFSYNC_FUZZ_EXAMPLES=5000 BPFSYNC_FUZZ_MIN_FRAMES=100000 PATH=$(CURDIR)/$(VENV)/bin:$$PATH \
		$(PY) -m pytest -p no:cacheprovider -s tests/agent/test_fuzz.py $(PYTEST_ARGS)

# --- a fresh machine passes: a new Debian 12 root (mmdebstrap), a clean clone of HEAD, and in it
# `make setup vm-kernel`, a smoke `make test`, one VM boot and `make demo` (needs root, ~4 GB) --
.PHONY: fresh-check
fresh-check:
	bash tests/fresh/fresh-check.sh

# --- the agent's container image, localhost/bpfsync:<version> (deploy/image/README.md): a Debian
# root from mmdebstrap, podman import, the agent's wheel and its PyPI dependencies in a venv ---
.PHONY: image
image: venv bpf proto
	bash deploy/image/build.sh

bench: setup vm-kernel
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/run.py

clean:
	rm -rf $(VENV) $(CACHE) $(BPF_OBJ) $(PROTO_DIR)/*_pb2*.py $(PROTO_DIR)/*_pb2*.pyi
