# featurepush: `make run` serves, `make test` checks everything, `make bench` measures.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(sort $(wildcard proto/featurepush/v1/*.proto))
GEN_DIR := client/featurepush/v1
# The descriptors with their comments, which reflection serves, and the .proto files the wheel carries.
DESCRIPTOR_SET := $(GEN_DIR)/featurepush.binpb
PROTO_COPY_DIR := client/featurepush/proto/featurepush/v1
GENERATED := $(patsubst proto/featurepush/v1/%.proto,$(GEN_DIR)/%_pb2.py,$(PROTOS)) $(DESCRIPTOR_SET)

LISTEN ?= localhost:50051
DATA_DIR ?= ./data

.PHONY: install generate check-generated lint typecheck test run bench fuzz soak clean redis-server

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,dev]'
	touch $@

# The stubs are committed so that a plain `pip install` needs no protoc; this rule refreshes them.
generate: $(GENERATED)

$(GENERATED) &: $(PROTOS) | $(STAMP)
	$(PY) -m grpc_tools.protoc -I proto --python_out=client --pyi_out=client --grpc_python_out=client \
		--include_imports --include_source_info --descriptor_set_out=$(DESCRIPTOR_SET) $(PROTOS)
	rm -rf $(PROTO_COPY_DIR) && mkdir -p $(PROTO_COPY_DIR) && cp $(PROTOS) $(PROTO_COPY_DIR)/
	touch $(GENERATED)

check-generated: $(STAMP)
	$(PY) tools/check_generated.py

lint: $(STAMP)
	$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check client server tests bench tools examples
	$(VENV)/bin/ruff format --check client server tests bench tools examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) redis-server check-generated lint typecheck
	$(PY) -m pytest -q

# The Redis store's tests start real redis-server processes; CI runs as root with apt.
redis-server:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

run: $(STAMP)
	$(VENV)/bin/featurepush serve --listen $(LISTEN) --data-dir $(DATA_DIR) --definitions examples/ad_impressions.py \
		--definitions examples/ad_impressions_views.py

bench: $(STAMP)
	$(PY) -m bench

# Arbitrary bytes and messages to every RPC of a real server; FUZZ_SECONDS=600 for a longer run.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(PY) tools/fuzz.py --seconds $(FUZZ_SECONDS)

# Pushes through kill -9 restarts of a server, then checks every acknowledged record; `make test` runs 15 s of it.
SOAK_SECONDS ?= 60
soak: $(STAMP)
	$(PY) tools/soak.py --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
