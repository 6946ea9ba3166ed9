# Sourced by scripts/test.sh and scripts/slow.sh from the repository's root: makes .venv
# and installs the project, makes sure PostgreSQL and Redis answer (starting the local
# ones if they are down), and names them for the tests.
bash scripts/setup.sh
bash scripts/services.sh
export EUM_TEST_PG_URL="${EUM_TEST_PG_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"
export EUM_TEST_REDIS_URL="${EUM_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"
